"""IntegerReport: how much of a model the integer importer lowered to integer arithmetic."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class IntegerReport:
    """Counts of ops and multiply-accumulates lowered to integer arithmetic, and the ops left in float.

    ``float_ops`` lists (TFLite op name, reason) for every op computed (partly) in float, e.g. the
    QUANTIZE of a float model input.
    """

    ops_total: int
    ops_integer: int
    macs_total: int
    macs_integer: int
    float_ops: list[tuple[str, str]] = field(default_factory=list)

    @property
    def integer_mac_fraction(self) -> float:
        return self.macs_integer / self.macs_total if self.macs_total else 1.0

    def summary(self) -> str:
        text = (
            f"{self.ops_integer} of {self.ops_total} ops run in integer arithmetic, covering "
            f"{self.macs_integer:,} of {self.macs_total:,} multiply-accumulates "
            f"({100.0 * self.integer_mac_fraction:.1f}%, int8/uint8 x int8 with int32 accumulation)."
        )
        if self.float_ops:
            listed = "; ".join(f"{name}: {reason}" for name, reason in self.float_ops)
            text += f" Computed in float: {listed}."
        else:
            text += " No op is computed in float."
        return text

    def to_dict(self) -> dict:
        data = asdict(self)
        data["float_ops"] = [list(pair) for pair in self.float_ops]
        return data
