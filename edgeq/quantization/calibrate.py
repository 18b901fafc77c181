"""Range collection: run the float model in TFLite's reference interpreter with every tensor kept."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from ..reference import _interpreter_class
from .config import QuantConfig

Progress = Callable[[str], None]


def open_interpreter(model_path: str | os.PathLike[str], num_threads: int = 2):
    """A reference-kernel TFLite interpreter whose intermediate tensors stay readable after invoke()."""
    interpreter_class = _interpreter_class()
    module = sys.modules[interpreter_class.__module__]
    interpreter = interpreter_class(
        model_path=str(model_path),
        num_threads=num_threads,
        experimental_op_resolver_type=module.OpResolverType.BUILTIN_REF,
        experimental_preserve_all_tensors=True,
    )
    interpreter.allocate_tensors()
    return interpreter


def invoke(interpreter, feeds: Sequence[np.ndarray]) -> None:
    for detail, value in zip(interpreter.get_input_details(), feeds):
        interpreter.set_tensor(detail["index"], value)
    interpreter.invoke()


@dataclass
class TensorRange:
    """What calibration saw of one float tensor: min/max, and a histogram for percentile clipping."""

    low: float = np.inf
    high: float = -np.inf
    histogram: np.ndarray | None = field(default=None, repr=False)
    edges: tuple[float, float] = (0.0, 0.0)  # histogram range (of |x| when symmetric)

    def observe(self, values: np.ndarray) -> None:
        if values.size:
            self.low = min(self.low, float(values.min()))
            self.high = max(self.high, float(values.max()))

    def clipped(self, config: QuantConfig) -> tuple[float, float]:
        """The (low, high) to quantize: observed, or the histogram's central ``percentile`` %."""
        low, high = (self.low, self.high) if np.isfinite(self.low) else (0.0, 0.0)
        if config.method != "percentile" or self.histogram is None or self.histogram.sum() == 0:
            return low, high
        counts = np.cumsum(self.histogram) / self.histogram.sum()
        start, stop = self.edges
        width = (stop - start) / len(self.histogram)
        keep = config.percentile / 100.0
        if config.symmetric:
            bound = start + width * (int(np.searchsorted(counts, keep)) + 1)
            return max(low, -bound), min(high, bound)
        tail = (1.0 - keep) / 2
        clipped_low = start + width * int(np.searchsorted(counts, tail))
        clipped_high = start + width * (int(np.searchsorted(counts, 1.0 - tail)) + 1)
        return max(low, clipped_low), min(high, clipped_high)


def collect_ranges(
    model_path: str | os.PathLike[str],
    feeds: Sequence[list[np.ndarray]],
    tensors: Iterable[int],
    config: QuantConfig,
    progress: Progress | None = None,
) -> dict[int, TensorRange]:
    """Per-tensor ranges of ``tensors`` (flatbuffer indices) over ``feeds``; histograms when percentile."""
    interpreter = open_interpreter(model_path)
    ranges = {index: TensorRange() for index in tensors}
    say = progress or (lambda _: None)
    every = max(1, len(feeds) // 10)
    for n, feed in enumerate(feeds, 1):
        invoke(interpreter, feed)
        for index, observed in ranges.items():
            observed.observe(interpreter.get_tensor(index))
        if n % every == 0 or n == len(feeds):
            say(f"calibrating: {n}/{len(feeds)} samples")
    if config.method == "percentile":
        for observed in ranges.values():
            top = max(abs(observed.low), abs(observed.high)) if config.symmetric else observed.high
            bottom = 0.0 if config.symmetric else observed.low
            if not np.isfinite(top) or top <= bottom:
                continue
            observed.edges = (bottom, top)
            observed.histogram = np.zeros(config.bins, np.int64)
        for feed in feeds:
            invoke(interpreter, feed)
            for index, observed in ranges.items():
                if observed.histogram is not None:
                    values = interpreter.get_tensor(index).ravel()
                    values = np.abs(values) if config.symmetric else values
                    observed.histogram += np.histogram(values, config.bins, observed.edges)[0]
        say("calibrating: histograms collected")
    return ranges
