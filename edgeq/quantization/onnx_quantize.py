"""int8 quantization of float ONNX models with onnxruntime's quantizer, and the accuracy budget.

    quantizer = OnnxQuantizer(read_onnx("model.onnx"), calibration_tensors, QuantConfig(), workdir)
    qdq_path = quantizer.build()                       # every op onnxruntime quantizes, in int8
    qdq_path = quantizer.build(frozenset({"Conv.3"}))  # that node kept float

The result is a QDQ ONNX model (QuantizeLinear/DequantizeLinear around each quantized op):
weights int8 symmetric per output channel, activations per tensor (uint8 asymmetric, or int8
symmetric with ``QuantConfig.symmetric``), biases int32. Calibration runs once (its ranges are
cached) and every ``build`` reuses it, so the accuracy-aware fallback can try many variants.
edgeq compiles QDQ ONNX models in TVM's dequantize -> float -> quantize lowering.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import EdgeqError, MissingDependencyError
from ..manifest import Preprocess
from ..onnx_model import OnnxModel, read_onnx
from .config import QuantConfig
from .fallback import FallbackReport, LayerSensitivity, fit_accuracy_budget
from .evaluation import EvalSample, metric_name, top1_accuracy

Progress = Callable[[str], None]
#: Ops with multiply-accumulates: their MACs count towards the int8 share.
MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: Ops ranked for the fallback: the MAC ops and the computing ops onnxruntime quantizes (data
#: movement such as Reshape or Transpose only passes its input's quantization on).
RANKED_OPS = MAC_OPS + ("Add", "Mul", "AveragePool", "GlobalAveragePool", "MaxPool", "Softmax", "Sigmoid",
                        "Relu", "LeakyRelu", "Clip", "Resize", "Concat", "InstanceNormalization",
                        "LayerNormalization", "BatchNormalization", "Where")
Feeds = dict[str, np.ndarray]


def _ort():
    try:
        import onnxruntime
        import onnxruntime.quantization as quantization

        return onnxruntime, quantization
    except ImportError:
        raise MissingDependencyError("quantizing ONNX models needs onnxruntime: pip install 'edgeq[host]'") from None


def ort_session(model: str | Path | bytes, threads: int = 2) -> Any:
    """An onnxruntime CPU session (quiet logging)."""
    onnxruntime, _ = _ort()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def snr_db(reference: np.ndarray, value: np.ndarray) -> tuple[float, float]:
    """(SNR in dB, relative error) of ``value`` against ``reference``; (inf, 0) when identical."""
    reference = reference.astype(np.float64)
    noise = float(np.sum((reference - value.astype(np.float64)) ** 2))
    signal = float(np.sum(reference ** 2))
    if noise == 0.0:
        return math.inf, 0.0
    return 10.0 * math.log10(max(signal, 1e-30) / noise), math.sqrt(noise / max(signal, 1e-30))


@contextlib.contextmanager
def _quiet():
    """Silence onnxruntime's quantizer: its advice goes to the root logger, the calibrators print."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: Sequence[Feeds]) -> None:
        self._feeds = list(feeds)
        self._next = 0

    def get_next(self) -> Feeds | None:
        if self._next >= len(self._feeds):
            return None
        self._next += 1
        return self._feeds[self._next - 1]

    def __len__(self) -> int:
        return len(self._feeds)


@dataclass(frozen=True)
class Layer:
    """A quantizable node of the (pre-processed) float model."""

    name: str  # node name: what ``nodes_to_exclude`` takes
    op: str
    output: str  # its output tensor
    macs: int


class OnnxQuantizer:
    """Calibrate a float ONNX model once; write QDQ variants with chosen nodes kept float."""

    def __init__(self, model: OnnxModel, calibration: Sequence[Feeds], config: QuantConfig, workdir: Path,
                 progress: Progress | None = None) -> None:
        if model.is_qdq:
            raise EdgeqError(f"{model.path.name} is already quantized (QDQ); package it without --quantize")
        if not calibration:
            raise EdgeqError("quantizing needs at least one calibration sample")
        _, quantization = _ort()
        self.model = model
        self.config = config
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._say = progress or (lambda _: None)
        self._calibration = list(calibration)[: config.samples]
        self._cache = self.workdir / "calibration.json"
        self.float_path = self.workdir / f"{model.path.stem}_prepared.onnx"
        self._say("preparing the float model (batch 1, shape inference, Conv+BatchNorm folding)")
        batch_one = self.workdir / f"{model.path.stem}_batch1.onnx"
        batch_one.write_bytes(model.proto().SerializeToString())
        try:
            with _quiet():
                quantization.quant_pre_process(str(batch_one), str(self.float_path), skip_symbolic_shape=True)
        except Exception as error:  # onnxruntime raises assorted errors on graphs it cannot optimise
            raise EdgeqError(f"onnxruntime could not prepare {model.path.name} for quantization: {error}") from None
        _name_nodes(self.float_path)
        self.layers = _layers(self.float_path)
        self._builds = 0

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    def build(self, keep_float: frozenset[str] = frozenset(), only: Sequence[str] | None = None) -> Path:
        """Write the QDQ model with the nodes in ``keep_float`` left in float (or only ``only`` quantized)."""
        _, quantization = _ort()
        config = self.config
        methods = {"minmax": quantization.CalibrationMethod.MinMax,
                   "percentile": quantization.CalibrationMethod.Percentile,
                   "entropy": quantization.CalibrationMethod.Entropy}
        activation = quantization.QuantType.QInt8 if config.symmetric else quantization.QuantType.QUInt8
        extra = {"WeightSymmetric": True, "ActivationSymmetric": config.symmetric,
                 "CalibPercentile": config.percentile, "CalibTensorRangeSymmetric": config.symmetric}
        self._builds += 1
        output = self.workdir / f"{self.model.path.stem}_qdq_{self._builds}.onnx"
        if not self._cache.exists():
            self._say(f"calibrating {len(self._calibration)} sample(s) with onnxruntime ({config.method})")
        try:
            with _quiet():
                quantization.quantize_static(
                    str(self.float_path), str(output), _Reader(self._calibration),
                    quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                    activation_type=activation, weight_type=quantization.QuantType.QInt8,
                    nodes_to_exclude=sorted(keep_float), nodes_to_quantize=list(only) if only is not None else None,
                    calibrate_method=methods[config.method], extra_options=extra,
                    calibration_cache_path=str(self._cache),
                )
        except Exception as error:
            raise EdgeqError(f"onnxruntime could not quantize {self.model.path.name}: {error}") from None
        return output

    def sensitivities(self, samples: Sequence[Feeds]) -> tuple[LayerSensitivity, ...]:
        """Per-layer error: each ranked layer quantized alone (its input, weights and output), its
        dequantized output against the float model's on ``samples``."""
        float_outputs = _tensor_values(self.float_path, [layer.output for layer in self.layers], samples)
        result = []
        for number, layer in enumerate(self.layers, 1):
            self._say(f"sensitivity {number}/{len(self.layers)}: {layer.name} ({layer.op})")
            path = self.build(only=[layer.name])
            tensor = _dequantized_name(path, layer.output)
            values = _tensor_values(path, [tensor], samples)[tensor]
            reference = float_outputs[layer.output]
            snr, relative = snr_db(np.concatenate([r.reshape(-1) for r in reference]),
                                   np.concatenate([v.reshape(-1) for v in values]))
            result.append(LayerSensitivity(layer.name, layer.op, snr, relative, layer.macs))
            path.unlink(missing_ok=True)
        return tuple(result)


def _name_nodes(path: Path) -> None:
    """Give every unnamed node (the optimizer's fusions leave some) a unique name: the fallback
    excludes nodes by name."""
    import onnx

    model = onnx.load(str(path))
    taken = {node.name for node in model.graph.node if node.name}
    unnamed = [node for node in model.graph.node if not node.name]
    for number, node in enumerate(unnamed):
        name = f"{node.op_type}_{number}"
        while name in taken:
            name += "_"
        node.name = name
        taken.add(name)
    if unnamed:
        onnx.save(model, str(path))


def _layers(path: Path) -> tuple[Layer, ...]:
    """The ranked-op nodes of a shape-inferred model with their multiply-accumulate counts (0 for
    elementwise ops)."""
    import onnx

    model = onnx.load(str(path))
    shapes = {}
    for value in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    weights = {init.name: tuple(init.dims) for init in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        if node.op_type not in RANKED_OPS:
            continue
        output = shapes.get(node.output[0])
        weight = weights.get(node.input[1]) if len(node.input) > 1 else None
        macs = 0
        if node.op_type not in MAC_OPS:
            pass  # elementwise, pooling, normalisation: no multiply-accumulates counted
        elif output and weight:
            if node.op_type in ("Conv", "ConvTranspose"):
                macs = int(np.prod(output)) * int(np.prod(weight[1:]))
            else:  # Gemm / MatMul: every output element sums K products
                transposed = any(a.name == "transB" and a.i for a in node.attribute)
                k = weight[-1] if transposed else weight[0]
                macs = int(np.prod(output)) * int(k)
        elif output and len(node.input) > 1 and node.input[0] in shapes:
            macs = int(np.prod(output)) * int(shapes[node.input[0]][-1])
        layers.append(Layer(node.name, node.op_type, node.output[0], macs))
    return tuple(layers)


def _dequantized_name(path: Path, tensor: str) -> str:
    """The tensor consumers of ``tensor`` read in a QDQ model: its DequantizeLinear output if any."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    quantized = {node.output[0] for node in model.graph.node if node.op_type == "QuantizeLinear" and node.input[0] == tensor}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in quantized:
            return node.output[0]
    return tensor


def _tensor_values(path: Path, tensors: Sequence[str], samples: Sequence[Feeds]) -> dict[str, list[np.ndarray]]:
    """Values of intermediate ``tensors`` over ``samples`` (exposed as extra graph outputs)."""
    import onnx

    model = onnx.load(str(path))
    present = {output.name for output in model.graph.output}
    for name in tensors:
        if name not in present:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort_session(model.SerializeToString())
    values: dict[str, list[np.ndarray]] = {name: [] for name in tensors}
    for feeds in samples:
        for name, value in zip(tensors, session.run(list(tensors), feeds)):
            values[name].append(value)
    return values


def ort_top1_accuracy(path: str | Path, samples: Sequence[EvalSample], reference_top1: Sequence[int] | None = None) -> float:
    """Top-1 accuracy (percent) of an ONNX model in onnxruntime on ``samples``."""
    session = ort_session(path)
    return top1_accuracy(lambda feeds: session.run(None, feeds)[0], samples, reference_top1)


@dataclass(frozen=True)
class OnnxQuantizationReport:
    """What ``quantize_onnx`` did: the calibration, the QDQ model and, with a budget, the fallback."""

    model: str
    method: str
    symmetric: bool
    samples: int  # calibration samples used
    quantized_nodes: int  # QuantizeLinear nodes in the result (activation tensors quantized)
    seconds: float
    fallback: FallbackReport | None = None

    def summary(self) -> str:
        activations = "int8 symmetric" if self.symmetric else "uint8 asymmetric"
        text = (f"quantized {self.model} with onnxruntime ({self.method}, {self.samples} calibration sample(s)): "
                f"int8 per-channel weights, {activations} activations, QDQ format; it runs in TVM's "
                "dequantize -> float -> quantize lowering (edgeq's bit-exact integer kernels are TFLite-only)")
        if self.fallback is not None:
            text += "; " + self.fallback.summary()
        return text

    def table(self) -> str:
        return self.fallback.table() if self.fallback is not None else ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "method": self.method, "symmetric": self.symmetric, "samples": self.samples,
            "quantizer": "onnxruntime.quantization.quantize_static (QDQ)", "quantized_tensors": self.quantized_nodes,
            "seconds": self.seconds, "fallback": self.fallback.to_dict() if self.fallback is not None else None,
            "summary": self.summary(),
        }


def quantize_onnx(
    model: OnnxModel,
    calibration: Sequence[Feeds],
    config: QuantConfig,
    output: str | Path,
    *,
    evaluation: Sequence[EvalSample] | None = None,
    workdir: str | Path | None = None,
    progress: Progress | None = None,
) -> OnnxQuantizationReport:
    """Quantize ``model`` to a QDQ ONNX file at ``output``; nodes named in ``config.float_layers`` stay float.

    With ``config.max_accuracy_drop`` (percentage points) the top-1 on ``evaluation`` (labelled
    samples, or agreement with the float model for unlabelled ones; without it every 4th calibration
    sample is held out) is measured in onnxruntime; when the drop exceeds the budget, the most
    sensitive nodes (``RANKED_OPS``) return to float one at a time until it holds
    (``config.min_float_layers`` > 0 forces that many).
    """
    import shutil
    import tempfile

    import onnx

    started = time.perf_counter()
    say = progress or (lambda _: None)
    feeds = list(calibration)
    budget = config.max_accuracy_drop is not None
    if budget and evaluation is None:
        if len(feeds) < 2:
            raise EdgeqError("an accuracy budget without an evaluation set needs at least 2 calibration samples")
        evaluation = [EvalSample(f, None) for f in feeds[3::4] or feeds[-1:]]
        feeds = [f for number, f in enumerate(feeds) if number % 4 != 3 or len(feeds) < 4]
    with tempfile.TemporaryDirectory(prefix="edgeq-onnx-quantize-") as scratch:
        quantizer = OnnxQuantizer(model, feeds, config, Path(workdir or scratch), say)
        unknown = sorted(set(config.float_layers) - {node.name for node in onnx.load(str(quantizer.float_path)).graph.node})
        if unknown:
            names = ", ".join(layer.name for layer in quantizer.layers[:6])
            raise EdgeqError(f"float_layers names unknown ONNX node(s) {', '.join(unknown)}; node names look like {names}")
        fallback = None
        if not budget:
            result = quantizer.build(frozenset(config.float_layers))
        else:
            if not evaluation:
                raise EdgeqError("the evaluation set is empty; give pictures with --eval DIR or leave it out")
            float_session = ort_session(quantizer.float_path)
            reference = [int(np.argmax(float_session.run(None, s.inputs)[0])) for s in evaluation]
            float_accuracy = top1_accuracy(lambda inputs: float_session.run(None, inputs)[0], evaluation, reference)
            say(f"float model: {float_accuracy:.1f}% ({metric_name(evaluation)})")
            probe = [s.inputs for s in evaluation[:16]]
            # Nodes whose output came out exact were not quantized on their own (e.g. a Relu fused
            # into its Conv): returning them to float would change nothing.
            sensitivities = [s for s in quantizer.sensitivities(probe)
                             if s.name not in config.float_layers and math.isfinite(s.snr_db)]
            result, fallback = fit_accuracy_budget(
                sensitivities, lambda keep: quantizer.build(keep | config.float_layers),
                lambda path: ort_top1_accuracy(path, evaluation, reference),
                float_accuracy, config.max_accuracy_drop,
                min_float_layers=config.min_float_layers, max_float_layers=config.max_float_layers, progress=say,
                metric=metric_name(evaluation), samples=len(evaluation), total_macs=quantizer.total_macs,
            )
        shutil.copyfile(result, output)
    quantized = sum(node.op_type == "QuantizeLinear" for node in onnx.load(str(output)).graph.node)
    return OnnxQuantizationReport(
        model=model.path.name, method=config.method, symmetric=config.symmetric,
        samples=min(len(feeds), config.samples), quantized_nodes=quantized,
        seconds=time.perf_counter() - started, fallback=fallback,
    )


def quantize_for_bundle(
    model: OnnxModel,
    preprocess: Preprocess,
    config: QuantConfig,
    calibration_dir: Path,
    workdir: Path,
    *,
    eval_dir: Path | None = None,
    labels: Sequence[str] = (),
    progress: Progress | None = None,
) -> tuple[OnnxModel, OnnxQuantizationReport]:
    """``edgeq package model.onnx --quantize int8``: calibrate on pictures through the bundle's
    pre-processing, quantize (with ``config``'s accuracy budget, if any) and read the QDQ result.
    ``eval_dir`` sub-folders name classes by index or by one of ``labels``."""
    from dataclasses import replace

    from .config import picture_calibration
    from .evaluation import labelled_pictures

    say = progress or (lambda _: None)
    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4:
        raise EdgeqError("--calibration DIR needs a single-picture-input model")
    spec = model.inputs[0]
    budget = config.max_accuracy_drop is not None
    limit = config.samples_to_read(evaluation_given=eval_dir is not None)
    calibration = list(picture_calibration(calibration_dir, spec, preprocess, limit=limit))
    evaluation = labelled_pictures(eval_dir, spec, preprocess, labels) if budget and eval_dir else None
    output = Path(workdir) / f"{model.path.stem}_int8.onnx"
    report = quantize_onnx(model, calibration, config, output, evaluation=evaluation,
                           workdir=Path(workdir) / "onnx-quantize", progress=say)
    if report.fallback is not None:
        for line in report.fallback.table().splitlines():
            say(line)
    say(report.summary())
    return replace(read_onnx(output), labels=model.labels, preprocess=model.preprocess), report
