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
    """What calibration saw of one float tensor: min/max, and a histogram for percentile or entropy clipping."""

    low: float = np.inf
    high: float = -np.inf
    histogram: np.ndarray | None = field(default=None, repr=False)
    edges: tuple[float, float] = (0.0, 0.0)  # histogram range (of |x| when symmetric)

    def observe(self, values: np.ndarray) -> None:
        if values.size:
            self.low = min(self.low, float(values.min()))
            self.high = max(self.high, float(values.max()))

    def clipped(self, config: QuantConfig) -> tuple[float, float]:
        """The (low, high) to quantize: observed, the histogram's central ``percentile`` %, or
        the entropy (KL-divergence) threshold of the magnitudes."""
        low, high = (self.low, self.high) if np.isfinite(self.low) else (0.0, 0.0)
        if config.method == "minmax" or self.histogram is None or self.histogram.sum() == 0:
            return low, high
        start, stop = self.edges
        width = (stop - start) / len(self.histogram)
        if config.method == "entropy":
            # One-sided tensors get all 256 levels between 0 and the threshold; two-sided ones half.
            one_sided = (low >= 0 or high <= 0) and not config.symmetric
            bound = entropy_threshold(self.histogram, stop, 255 if one_sided else 128)
            return max(low, -bound), min(high, bound)
        counts = np.cumsum(self.histogram) / self.histogram.sum()
        keep = config.percentile / 100.0
        if config.symmetric:
            bound = start + width * (int(np.searchsorted(counts, keep)) + 1)
            return max(low, -bound), min(high, bound)
        tail = (1.0 - keep) / 2
        clipped_low = start + width * int(np.searchsorted(counts, tail))
        clipped_high = start + width * (int(np.searchsorted(counts, 1.0 - tail)) + 1)
        return max(low, clipped_low), min(high, clipped_high)


def _kl_divergence(histogram: np.ndarray, tail: float, levels: int) -> float:
    """KL(P || Q) of clipping the magnitudes at the end of ``histogram`` (``tail`` is what lies beyond).

    P is ``histogram`` with ``tail`` folded into its last bin (what clipping does to the values);
    Q is ``histogram`` merged into ``levels`` quantization levels and spread back evenly over the
    bins that were non-empty (what quantizing with that many levels keeps of the distribution).
    """
    bins = len(histogram)
    reference = histogram.copy()
    reference[-1] += tail
    total = reference.sum()
    if total <= 0:
        return np.inf
    group = np.minimum(np.arange(bins) * levels // bins, levels - 1)
    nonzero = histogram > 0
    sums = np.bincount(group, weights=histogram, minlength=levels)
    counts = np.bincount(group, weights=nonzero, minlength=levels)
    spread = np.where(nonzero, sums[group] / np.maximum(counts[group], 1.0), 0.0)
    p = reference / total
    q = spread / max(spread.sum(), 1e-300)
    keep = p > 0
    return float(np.sum(p[keep] * np.log(p[keep] / np.maximum(q[keep], 1e-12))))


def _flatten_zeros(histogram: np.ndarray) -> np.ndarray:
    histogram = np.array(histogram, np.float64)
    if len(histogram) > 1:
        histogram[0] = histogram[1]
    return histogram


def kl_divergence_curve(histogram: np.ndarray, levels: int = 128, step: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """TensorRT's entropy calibration on a histogram of magnitudes (bins over [0, max|x|]).

    Candidate thresholds are the bin edges ``levels``, ``levels + step``, ... ``len(histogram)``;
    returns them (as bin counts) and KL(P || Q) of clipping there (see ``_kl_divergence``). The
    first bin takes the second's count, as NVIDIA's pytorch-quantization does: the spike of exact
    zeros after a ReLU would otherwise dominate P, and spreading it over a level's bins would make
    every wide threshold look bad (clipping ReLU outputs to about 1/8 of their range).
    """
    histogram = _flatten_zeros(histogram)
    bins = len(histogram)
    if bins <= levels:
        return np.asarray([bins]), np.asarray([0.0])
    candidates = np.unique(np.append(np.arange(levels, bins + 1, step), bins))
    tails = np.concatenate([np.cumsum(histogram[::-1])[::-1], [0.0]])  # tails[i] = sum(histogram[i:])
    divergences = np.asarray([_kl_divergence(histogram[:i], tails[i], levels) for i in candidates])
    return candidates, divergences


def entropy_threshold(histogram: np.ndarray, top: float, levels: int = 128) -> float:
    """The magnitude to clip at (``top`` is the histogram's upper edge): the KL-divergence minimum.

    Searches every 8th candidate first, then every bin around the best one.
    """
    histogram = _flatten_zeros(histogram)
    bins = len(histogram)
    candidates, divergences = kl_divergence_curve(histogram, levels, step=8)
    if not np.isfinite(divergences).any():
        return float(top)
    best = int(candidates[int(np.argmin(divergences))])
    tails = np.concatenate([np.cumsum(histogram[::-1])[::-1], [0.0]])
    near = [i for i in range(max(levels, best - 7), min(bins, best + 7) + 1)]
    best = min(near, key=lambda i: _kl_divergence(histogram[:i], tails[i], levels))
    return float(top) * best / bins


def collect_ranges(
    model_path: str | os.PathLike[str],
    feeds: Sequence[list[np.ndarray]],
    tensors: Iterable[int],
    config: QuantConfig,
    progress: Progress | None = None,
) -> dict[int, TensorRange]:
    """Per-tensor ranges of ``tensors`` (flatbuffer indices) over ``feeds``; histograms for percentile and entropy."""
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
    if config.method in ("percentile", "entropy"):
        magnitudes = config.symmetric or config.method == "entropy"  # histograms of |x| over [0, max|x|]
        for observed in ranges.values():
            top = max(abs(observed.low), abs(observed.high)) if magnitudes else observed.high
            bottom = 0.0 if magnitudes else observed.low
            if not np.isfinite(top) or top <= bottom:
                continue
            observed.edges = (bottom, top)
            observed.histogram = np.zeros(config.bins, np.int64)
        for feed in feeds:
            invoke(interpreter, feed)
            for index, observed in ranges.items():
                if observed.histogram is not None:
                    values = interpreter.get_tensor(index).ravel()
                    values = np.abs(values) if magnitudes else values
                    observed.histogram += np.histogram(values, config.bins, observed.edges)[0]
        say("calibrating: histograms collected")
    return ranges
