"""``quantize(float model, calibration data) -> int8 TFLite model + QuantizationReport``."""
from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputError
from ..int8.graph import read_graph
from ..tflite_model import read_tflite
from .calibrate import collect_ranges, invoke, open_interpreter
from .config import Calibration, QuantConfig, as_feeds
from .report import ErrorMeter, LayerReport, QuantizationReport
from .rewrite import Plan, activation_tensors, check_supported, write_quantized

Progress = Callable[[str], None]


def quantize(
    model_path: str | os.PathLike[str],
    calibration: Calibration,
    config: QuantConfig = QuantConfig(),
    output_path: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> QuantizationReport:
    """Calibrate a float TFLite model and write its fully-quantized int8 twin.

    ``calibration`` is any iterable of samples (``{input name: array}``, an array, or a list of
    arrays); at most ``config.samples`` are used. The written model has the float model's graph
    with QUANTIZE at each float input and DEQUANTIZE at each float output, so it takes and returns
    the same float tensors; it runs in TFLite's interpreter and packages through edgeq's integer
    importer. ``output_path`` defaults to MODEL_int8.tflite beside the model.

    Raises:
        UnsupportedModelError: the model is already quantized or uses ops that cannot be quantized.
        InputError: the calibration data is empty or does not fit the model's inputs.
    """
    started = time.perf_counter()
    say = progress or (lambda _: None)
    model_path = Path(model_path)
    output = Path(output_path) if output_path else model_path.with_name(f"{model_path.stem}_int8.tflite")
    model = read_tflite(model_path)
    graph = read_graph(model_path)
    check_supported(graph, model_path.name)

    feeds = []
    for sample in itertools.islice(calibration, config.samples):
        feeds.extend(as_feeds(sample, model.inputs))
    feeds = feeds[: config.samples]
    if not feeds:
        raise InputError("the calibration data is empty; give at least one sample")
    say(f"calibrating {model_path.name} on {len(feeds)} samples ({config.method})")
    tensors = activation_tensors(graph)
    observed = collect_ranges(model_path, feeds, tensors, config, say)
    ranges = {index: observed[index].clipped(config) for index in tensors}
    data, plan = write_quantized(graph, ranges, config, say)
    output.write_bytes(data)
    say(f"measuring the quantization error per layer")
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
    )


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
