"""IntegerReport: how much of a model the integer importer lowered to integer arithmetic."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

#: A quantized model's description starting with this names why its float islands are float
#: (edgeq.quantize writes e.g. "edgeq.quantize; float ops: kept float by the accuracy budget").
FLOAT_REASON_PREFIX = "edgeq.quantize; float ops: "
DEFAULT_FLOAT_REASON = "float32 in the model between DEQUANTIZE and QUANTIZE"


@dataclass(frozen=True)
class IntegerReport:
    """Counts of ops and multiply-accumulates lowered to integer arithmetic, and the ops left in float.

    ``float_ops`` lists (TFLite op name, reason) for every op computed (partly) in float, e.g. the
    QUANTIZE of a float model input, or a float island's CONV_2D (the reason names its output).
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
            text += f" Computed in float: {'; '.join(self._grouped_float_ops())}."
        else:
            text += " No op is computed in float."
        return text

    def _grouped_float_ops(self) -> list[str]:
        """'NAME: reason' once per distinct (name, reason), with a count and the outputs named."""
        groups: dict[tuple[str, str], list[str]] = {}
        for name, reason in self.float_ops:
            match = re.fullmatch(r"(.*) \(output (.*)\)", reason)
            key = (name, match.group(1) if match else reason)
            groups.setdefault(key, []).append(match.group(2) if match else "")
        lines = []
        for (name, reason), outputs in groups.items():
            count = f" x{len(outputs)}" if len(outputs) > 1 else ""
            named = [o for o in outputs if o]
            listed = f" ({', '.join(named[:6])}{', ...' if len(named) > 6 else ''})" if named else ""
            lines.append(f"{name}{count}: {reason}{listed}")
        return lines

    def to_dict(self) -> dict:
        data = asdict(self)
        data["float_ops"] = [list(pair) for pair in self.float_ops]
        return data
