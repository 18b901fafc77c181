"""What quantize() did, layer by layer, and how far each int8 tensor is from its float original."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .fallback import FallbackReport


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class LayerReport:
    """One op's output tensor: its calibrated range, int8 quantization and error on the calibration set."""

    index: int  # op index in the float model
    op: str
    tensor: str
    low: float  # the range the scale covers (nan for the float tail: see ``float``)
    high: float
    scale: float
    zero_point: int
    snr_db: float  # 10 log10(sum f^2 / sum (f - dequantized int8)^2); inf when identical
    relative_error: float  # ||f - dequantized|| / ||f||

    @property
    def float(self) -> bool:
        """Computed in float: kept float by the accuracy budget (or ``float_layers``), or data
        movement after the model outputs' DEQUANTIZE."""
        return math.isnan(self.scale)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("snr_db", "low", "high", "scale"):
            data[key] = _finite(data[key])
        return data


@dataclass(frozen=True)
class QuantizationReport:
    """The quantized model, how it was calibrated, and the per-layer table."""

    model: str
    output: str
    method: str
    symmetric: bool
    samples: int  # calibration samples used
    layers: tuple[LayerReport, ...]
    output_snr_db: float  # the model's float outputs vs the quantized model's, on the calibration set
    output_relative_error: float
    seconds: float
    fallback: FallbackReport | None = None  # the accuracy budget's search, when one was given

    @property
    def float_layers(self) -> tuple[LayerReport, ...]:
        """The layers computed in float in the written model."""
        return tuple(layer for layer in self.layers if layer.float)

    @property
    def worst(self) -> LayerReport | None:
        """The layer with the lowest SNR."""
        return min((layer for layer in self.layers if not layer.float), key=lambda layer: layer.snr_db, default=None)

    def table(self) -> str:
        rows = [f"{'#':>3} {'op':<18} {'range':>23} {'scale':>10} {'zp':>4} {'SNR dB':>7} {'rel.err':>8}  tensor"]
        for layer in self.layers:
            snr = f"{layer.snr_db:7.1f}" if math.isfinite(layer.snr_db) else f"{'exact':>7}"
            if layer.float:
                rows.append(f"{layer.index:>3} {layer.op:<18} {'float':>23} {'':>10} {'':>4} {snr} "
                            f"{layer.relative_error:8.4f}  {layer.tensor[:48]}")
                continue
            rows.append(
                f"{layer.index:>3} {layer.op:<18} [{layer.low:10.4g},{layer.high:10.4g}] {layer.scale:10.4g} "
                f"{layer.zero_point:>4} {snr} {layer.relative_error:8.4f}  {layer.tensor[:48]}"
            )
        if self.fallback is not None:
            rows += ["", self.fallback.table()]
        return "\n".join(rows)

    def summary(self) -> str:
        worst = self.worst
        text = (
            f"quantized {self.model} to int8 ({self.method}, {'symmetric' if self.symmetric else 'asymmetric'} "
            f"activations, {self.samples} samples): output SNR {self.output_snr_db:.1f} dB, "
            f"relative error {self.output_relative_error:.4f}"
        )
        if worst is not None:
            text += f"; lowest layer SNR {worst.snr_db:.1f} dB at #{worst.index} {worst.op}"
        if self.fallback is not None:
            text += f"\n{self.fallback.summary()}"
        return text

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = [layer.to_dict() for layer in self.layers]
        data["fallback"] = self.fallback.to_dict() if self.fallback is not None else None
        data["output_snr_db"] = _finite(self.output_snr_db)
        data["summary"] = self.summary()
        return data


class ErrorMeter:
    """Accumulates signal and noise energy of float vs dequantized int8 values."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0

    def add(self, reference, approximation) -> None:
        reference = reference.astype("float64")
        self.signal += float((reference * reference).sum())
        self.noise += float(((reference - approximation) ** 2).sum())

    @property
    def snr_db(self) -> float:
        if self.noise == 0:
            return math.inf
        if self.signal == 0:
            return -math.inf
        return 10 * math.log10(self.signal / self.noise)

    @property
    def relative_error(self) -> float:
        if self.signal == 0:
            return 0.0 if self.noise == 0 else math.inf
        return math.sqrt(self.noise / self.signal)
