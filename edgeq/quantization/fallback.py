"""Accuracy-aware fallback: return the most sensitive layers to float until an accuracy budget holds.

The search knows no model format. The caller gives per-layer sensitivities, a
``build(float_layers)`` that writes the quantized model with those layers kept float, and an
``accuracy(model)`` on its evaluation set; layers are ranked worst first (lowest SNR of the layer's
output, float vs de-quantized) and returned to float one at a time. The TFLite quantizer
(quantizer.py) and the ONNX one both drive it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

from ..errors import EdgeqError

T = TypeVar("T")


@dataclass(frozen=True)
class LayerSensitivity:
    """How much quantizing one layer perturbs its output on the measured samples."""

    name: str  # stable layer id the quantizer understands (TFLite: op output tensor name; ONNX: node name)
    op: str  # op type, e.g. "CONV_2D" or "Conv"
    snr_db: float  # float vs de-quantized layer output (higher is better; inf when identical)
    relative_error: float
    macs: int  # multiply-accumulates of the layer (0 for elementwise ops)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "op": self.op, "snr_db": _finite(self.snr_db),
            "relative_error": _finite(self.relative_error), "macs": self.macs,
        }


@dataclass(frozen=True)
class FallbackStep:
    """One model the search measured."""

    float_layers: tuple[str, ...]  # layers kept in float at this step
    accuracy: float  # percent, on the evaluation set


@dataclass(frozen=True)
class FallbackReport:
    """What the accuracy budget cost: the steps tried, the per-layer ranking and the final int8 share."""

    metric: str  # e.g. "top-1 agreement with the float model on 60 pictures"
    samples: int
    float_accuracy: float
    max_drop: float  # percentage points
    steps: tuple[FallbackStep, ...]  # steps[0] is the fully quantized model
    sensitivities: tuple[LayerSensitivity, ...]  # worst first
    int8_mac_share: float  # of the final model, 0..1
    met: bool
    chosen: int = -1  # index in ``steps`` of the model returned (the last step unless the budget was never met)

    @property
    def final(self) -> FallbackStep:
        """The step whose model was returned."""
        return self.steps[self.chosen]

    @property
    def float_layers(self) -> tuple[str, ...]:
        return self.final.float_layers

    def summary(self) -> str:
        final = self.final
        text = (
            f"accuracy budget: lose at most {self.max_drop:g} pt ({self.metric}): float {self.float_accuracy:.1f}%, "
            f"int8 {self.steps[0].accuracy:.1f}%, final {final.accuracy:.1f}% with "
            f"{len(final.float_layers)} layer(s) in float, {self.int8_mac_share:.1%} of MACs in int8"
        )
        if not self.met:
            text += (
                f"; WARNING: budget NOT met (best model kept: drop {self.float_accuracy - final.accuracy:.1f} pt); "
                f"try more calibration samples, another --calibration-method or a larger --max-accuracy-drop"
            )
        return text

    def table(self) -> str:
        """Per-layer sensitivity table (worst first; the final float layers marked) and the steps."""
        floats = set(self.final.float_layers)
        rows = [f"{'rank':>4} {'op':<18} {'SNR dB':>7} {'rel.err':>8} {'MACs':>11}  kept  layer"]
        for rank, layer in enumerate(self.sensitivities, 1):
            snr = f"{layer.snr_db:7.1f}" if math.isfinite(layer.snr_db) else f"{'exact':>7}"
            kept = "float" if layer.name in floats else "int8"
            rows.append(f"{rank:>4} {layer.op:<18} {snr} {layer.relative_error:8.4f} {layer.macs:>11}  "
                        f"{kept:<5} {layer.name[:60]}")
        rows.append(f"steps ({self.metric}; float model {self.float_accuracy:.1f}%, at most {self.max_drop:g} pt lost):")
        for number, step in enumerate(self.steps):
            added = step.float_layers[-1] if step.float_layers else "(fully int8)"
            mark = " <- chosen" if number == (self.chosen % len(self.steps)) else ""
            rows.append(f"{number:>4} {len(step.float_layers):>3} float  {step.accuracy:6.1f}%  {added[:60]}{mark}")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "samples": self.samples,
            "float_accuracy": self.float_accuracy,
            "max_drop": self.max_drop,
            "steps": [{"float_layers": list(s.float_layers), "accuracy": s.accuracy} for s in self.steps],
            "sensitivities": [layer.to_dict() for layer in self.sensitivities],
            "chosen": self.chosen % len(self.steps),
            "float_layers": list(self.final.float_layers),
            "final_accuracy": self.final.accuracy,
            "int8_mac_share": self.int8_mac_share,
            "met": self.met,
            "summary": self.summary(),
        }


def rank_worst_first(sensitivities: Sequence[LayerSensitivity]) -> tuple[LayerSensitivity, ...]:
    """Lowest SNR first; among equal SNRs the layer with more MACs first; then by name (stable)."""
    return tuple(sorted(sensitivities, key=lambda s: (s.snr_db, -s.macs, s.name)))


def int8_mac_share(sensitivities: Sequence[LayerSensitivity], float_layers, total_macs: int | None = None) -> float:
    """Share of MACs outside ``float_layers`` (1.0 when the model has no MACs)."""
    total = total_macs if total_macs is not None else sum(s.macs for s in sensitivities)
    if total <= 0:
        return 1.0
    floats = set(float_layers)
    return 1.0 - sum(s.macs for s in sensitivities if s.name in floats) / total


def fit_accuracy_budget(
    sensitivities: Sequence[LayerSensitivity],
    build: Callable[[frozenset[str]], T],
    accuracy: Callable[[T], float],
    float_accuracy: float,
    max_drop: float,
    *,
    min_float_layers: int = 0,
    max_float_layers: int | None = None,
    progress: Callable[[str], None] | None = None,
    metric: str = "accuracy",
    samples: int = 0,
    total_macs: int | None = None,
) -> tuple[T, FallbackReport]:
    """Return layers to float, worst first, one at a time, until accuracy >= float_accuracy - max_drop.

    ``steps[0]`` is always the fully quantized model. The search stops at the first model that
    meets the budget and has at least ``min_float_layers`` float layers, or after
    ``max_float_layers`` (default: every layer). When no model meets the budget the most accurate
    one found (fewest float layers among equals, at least ``min_float_layers``) is returned with ``met=False``.
    ``metric``/``samples`` describe the evaluation set in the report; ``total_macs`` is the model's
    MAC count when ``sensitivities`` do not cover every layer.
    """
    if max_drop < 0 or not math.isfinite(max_drop):
        raise EdgeqError(f"the accuracy budget must be a finite number of points >= 0, not {max_drop}")
    if min_float_layers < 0:
        raise EdgeqError(f"min_float_layers must be >= 0, not {min_float_layers}")
    say = progress or (lambda _: None)
    ranked = rank_worst_first(sensitivities)
    limit = len(ranked) if max_float_layers is None else min(max_float_layers, len(ranked))
    if min_float_layers > limit:
        raise EdgeqError(f"min_float_layers={min_float_layers} exceeds the {limit} layers that may be kept float")
    target = float_accuracy - max_drop

    steps: list[FallbackStep] = []
    best: tuple[float, int, T] | None = None  # (accuracy, step index, model)
    chosen_model: T | None = None
    chosen = -1
    for count in range(limit + 1):
        floats = tuple(layer.name for layer in ranked[:count])
        model = build(frozenset(floats))
        score = float(accuracy(model))
        steps.append(FallbackStep(floats, score))
        say(f"fallback step {count}: {score:.1f}% with {count} float layer(s)"
            + (f" (+{floats[-1]})" if floats else "") + f"; target {target:.1f}%")
        if count >= min_float_layers and (best is None or score > best[0]):
            best = (score, count, model)
        if score >= target and count >= min_float_layers:
            chosen_model, chosen = model, count
            break
    met = chosen_model is not None
    if not met:
        assert best is not None
        _, chosen, chosen_model = best
        say(f"WARNING: the accuracy budget of {max_drop:g} pt is not met even with {limit} float layer(s); "
            f"keeping the best model found ({best[0]:.1f}%, {chosen} float layer(s))")
    report = FallbackReport(
        metric=metric,
        samples=samples,
        float_accuracy=float(float_accuracy),
        max_drop=float(max_drop),
        steps=tuple(steps),
        sensitivities=ranked,
        int8_mac_share=int8_mac_share(ranked, steps[chosen].float_layers, total_macs),
        met=met,
        chosen=chosen,
    )
    return chosen_model, report  # type: ignore[return-value]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
