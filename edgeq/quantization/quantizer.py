"""``quantize(float model, calibration data) -> int8 TFLite model + QuantizationReport``."""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..errors import EdgeqError, InputError, UnsupportedModelError
from ..int8.graph import Graph, Operator, read_graph
from ..tflite_model import read_tflite
from .calibrate import collect_ranges, invoke, open_interpreter
from .config import Calibration, QuantConfig, as_feeds
from .evaluation import EvalSample, metric_name, top1, top1_accuracy
from .fallback import LayerSensitivity, fit_accuracy_budget
from .report import ErrorMeter, LayerReport, QuantizationReport
from .rewrite import Plan, activation_tensors, check_supported, float_layer_ops, write_quantized

Progress = Callable[[str], None]


def quantize(
    model_path: str | os.PathLike[str],
    calibration: Calibration,
    config: QuantConfig = QuantConfig(),
    output_path: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    *,
    evaluation: Iterable[EvalSample] | None = None,
) -> QuantizationReport:
    """Calibrate a float TFLite model and write its int8 twin.

    ``calibration`` is any iterable of samples (``{input name: array}``, an array, or a list of
    arrays); at most ``config.samples`` are used. The written model has the float model's graph
    with QUANTIZE at each float input and DEQUANTIZE at each float output, so it takes and returns
    the same float tensors; it runs in TFLite's interpreter and packages through edgeq's integer
    importer. ``output_path`` defaults to MODEL_int8.tflite beside the model.

    With ``config.max_accuracy_drop`` set, the int8 model's top-1 on ``evaluation`` (EvalSample
    list: labelled, or unlabelled and scored by agreement with the float model) is compared with the
    float model's; when it drops by more than the budget, the layers with the lowest SNR return to
    float one at a time until it holds (``report.fallback``). Without ``evaluation`` every 4th
    calibration sample is held out and scored by agreement with the float model.

    Raises:
        UnsupportedModelError: the model is already quantized or uses ops that cannot be quantized.
        InputError: the calibration (or evaluation) data is empty or does not fit the model's inputs.
    """
    started = time.perf_counter()
    say = progress or (lambda _: None)
    model_path = Path(model_path)
    output = Path(output_path) if output_path else model_path.with_name(f"{model_path.stem}_int8.tflite")
    model = read_tflite(model_path)
    graph = read_graph(model_path)
    check_supported(graph, model_path.name)
    float_layer_ops(graph, config.float_layers)  # unknown names fail before calibrating

    budget = config.max_accuracy_drop is not None
    if evaluation is not None and not budget:
        raise EdgeqError("an evaluation set is only used with an accuracy budget: set QuantConfig.max_accuracy_drop")
    if budget:
        _require_classifier(model, model_path.name)
    held_out = budget and evaluation is None
    wanted = config.samples_to_read(evaluation_given=evaluation is not None)
    feeds = []
    for sample in itertools.islice(calibration, wanted):
        feeds.extend(as_feeds(sample, model.inputs))
    feeds = feeds[:wanted]
    if not feeds:
        raise InputError("the calibration data is empty; give at least one sample")
    eval_samples: list[EvalSample] = []
    if held_out:
        if len(feeds) < 4:
            raise InputError("an accuracy budget without an evaluation set holds every 4th calibration sample out: "
                             f"give at least 4 samples (got {len(feeds)}) or an evaluation set")
        names = [spec.name for spec in model.inputs]
        eval_samples = [EvalSample(dict(zip(names, feed)), None) for feed in feeds[3::4]]
        feeds = [feed for n, feed in enumerate(feeds) if n % 4 != 3][: config.samples]
    elif budget:
        eval_samples = list(evaluation or ())
        if not eval_samples:
            raise InputError("the evaluation set is empty; give labelled pictures or leave it out")
    say(f"calibrating {model_path.name} on {len(feeds)} samples ({config.method})")
    tensors = activation_tensors(graph)
    observed = collect_ranges(model_path, feeds, tensors, config, say)
    ranges = {index: observed[index].clipped(config) for index in tensors}
    data, plan = write_quantized(graph, ranges, config, say)
    output.write_bytes(data)
    say("measuring the quantization error per layer")
    layers, out_meter = _measure(model_path, output, graph, plan, feeds)
    fallback = None
    if budget:
        fallback, data, plan = _fit_budget(model_path, output, graph, ranges, config, layers, eval_samples, say)
        if fallback.float_layers:  # the table and output SNR describe the model written
            output.write_bytes(data)
            layers, out_meter = _measure(model_path, output, graph, plan, feeds)
    return QuantizationReport(
        model=model_path.name,
        output=str(output),
        method=config.method,
        symmetric=config.symmetric,
        samples=len(feeds),
        layers=layers,
        output_snr_db=out_meter.snr_db,
        output_relative_error=out_meter.relative_error,
        seconds=time.perf_counter() - started,
        fallback=fallback,
    )


def _require_classifier(model, name: str) -> None:
    """The accuracy budget scores top-1: refuse models whose output is not one vector of class scores."""
    shapes = [spec.shape for spec in model.outputs]
    if len(shapes) != 1 or int(np.prod(shapes[0])) != max(shapes[0], default=0) or max(shapes[0], default=0) < 2:
        raise UnsupportedModelError(
            f"an accuracy budget measures top-1 classification, but {name} has outputs {shapes}; "
            "quantize it without a budget (--quantize int8) and check it with your own metric"
        )


#: Ops that add no quantization error of their own (exact data movement, max): never fallback candidates.
EXACT_OPS = frozenset({"RESHAPE", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE", "PAD", "MAX_POOL_2D", "CONCATENATION"})


def layer_macs(graph: Graph, op: Operator) -> int:
    """Multiply-accumulates of one op of the float graph (0 for ops without weights)."""
    out = graph.tensors[op.outputs[0]].shape
    if op.name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        filt = graph.tensors[op.inputs[1]].shape  # OHWI / 1HW(C*M)
        depth = 1 if op.name == "DEPTHWISE_CONV_2D" else filt[3]
        return int(np.prod(out)) * filt[1] * filt[2] * depth
    if op.name == "FULLY_CONNECTED":
        return int(np.prod(out)) * graph.tensors[op.inputs[1]].shape[1]
    return 0


def sensitivities(graph: Graph, layers: Sequence[LayerReport]) -> list[LayerSensitivity]:
    """The fallback candidates: every int8 op that adds error of its own, with its output's SNR.

    Ranked by fit_accuracy_budget on the output SNR alone: the simplest measure the quantizer already
    has. Error accumulates along the network, so layers near the outputs (cheap in MACs) rank first.
    """
    ops = {op.index: op for op in graph.operators}
    return [
        LayerSensitivity(layer.tensor, layer.op, layer.snr_db, layer.relative_error, layer_macs(graph, ops[layer.index]))
        for layer in layers
        if layer.op not in EXACT_OPS and not layer.float
    ]


def _fit_budget(model_path: Path, output: Path, graph: Graph, ranges, config: QuantConfig,
                layers: Sequence[LayerReport], samples: list[EvalSample], say: Progress):
    """Run fit_accuracy_budget over write_quantized; returns (FallbackReport, model bytes, Plan)."""
    assert config.max_accuracy_drop is not None
    inputs_spec = read_tflite(model_path).inputs

    def predictor(path: Path):
        interpreter = open_interpreter(path)
        output_index = interpreter.get_output_details()[0]["index"]

        def predict(inputs: dict[str, np.ndarray]) -> np.ndarray:
            invoke(interpreter, next(as_feeds(inputs, inputs_spec)))
            return interpreter.get_tensor(output_index)

        return predict

    float_predict = predictor(model_path)
    reference_top1 = [top1(float_predict(sample.inputs)) for sample in samples]
    float_accuracy = top1_accuracy(float_predict, samples, reference_top1)
    forced = config.float_layers  # always float, besides the layers the search returns to float
    candidates = [c for c in sensitivities(graph, layers) if c.name not in forced]
    macs = {graph.tensors[op.outputs[0]].name: layer_macs(graph, op) for op in graph.operators}
    total_macs = sum(macs.values())
    scratch = output.with_name(f"{output.stem}.fallback.tflite")

    def build(float_layers: frozenset[str]):
        return write_quantized(graph, ranges, replace(config, float_layers=float_layers | forced),
                               float_reason="kept float by the accuracy budget")

    def accuracy(built) -> float:
        scratch.write_bytes(built[0])
        return top1_accuracy(predictor(scratch), samples, reference_top1)

    try:
        (data, plan), report = fit_accuracy_budget(
            candidates, build, accuracy, float_accuracy, config.max_accuracy_drop,
            min_float_layers=config.min_float_layers, max_float_layers=config.max_float_layers, progress=say,
            metric=metric_name(samples), samples=len(samples), total_macs=total_macs,
        )
    finally:
        scratch.unlink(missing_ok=True)
    if forced:
        floats = set(forced) | set(report.float_layers)
        report = replace(report, int8_mac_share=1.0 - sum(macs[n] for n in floats) / total_macs if total_macs else 1.0)
    return report, data, plan


def _measure(float_path: Path, int8_path: Path, graph, plan: Plan, feeds) -> tuple[tuple[LayerReport, ...], ErrorMeter]:
    """Float vs dequantized int8 value of every op output (and of the model outputs) over ``feeds``."""
    reference, quantized = open_interpreter(float_path), open_interpreter(int8_path)
    ops = [op for op in graph.operators if op.outputs[0] in plan.tensor]
    meters = {op.outputs[0]: ErrorMeter() for op in ops}
    out_meter = ErrorMeter()
    out_details = quantized.get_output_details()
    for feed in feeds:
        invoke(reference, feed)
        invoke(quantized, feed)
        for index, meter in meters.items():
            scale, zero_point = plan.quant.get(index, (1.0, 0))  # the float tail is read as it is
            q = quantized.get_tensor(plan.tensor[index]).astype(np.float64)
            meter.add(reference.get_tensor(index), (q - zero_point) * scale)
        for index, detail in zip(graph.outputs, out_details):
            out_meter.add(reference.get_tensor(index), quantized.get_tensor(detail["index"]).astype(np.float64))
    layers = []
    for op in ops:
        index = op.outputs[0]
        low, high = plan.ranges.get(index, (float("nan"), float("nan")))
        scale, zero_point = plan.quant.get(index, (float("nan"), 0))  # nan: float (the tail)
        meter = meters[index]
        layers.append(
            LayerReport(
                index=op.index, op=op.name, tensor=graph.tensors[index].name, low=float(low), high=float(high),
                scale=float(scale), zero_point=int(zero_point), snr_db=meter.snr_db, relative_error=meter.relative_error,
            )
        )
    return tuple(layers), out_meter
