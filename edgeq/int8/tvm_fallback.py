"""Per-op fallback: an op edgeq has no integer kernel for runs in TVM's dequantize -> float -> quantize.

The rest of the model keeps edgeq's bit-exact integer kernels; only the op itself goes through TVM's
TFLite frontend, which reads its quantized inputs (the values edgeq computed, same dtypes and
quantization as the model records), dequantizes them, runs the float op and quantizes the result.
Its outputs follow TFLite's within rounding steps, not bit for bit, and the package report names it.
"""
from __future__ import annotations

from typing import Any

from tvm import relax

from ..errors import UnsupportedModelError
from .context import Lowered, LoweringContext
from .graph import Operator

FALLBACK_REASON = "no integer kernel in edgeq: TVM's dequantize -> float -> quantize (within rounding steps of TFLite)"


class TvmOpFallback:
    """Lowers single ops of one TFLite model with TVM's frontend, into the caller's Relax block."""

    def __init__(self, model_bytes: bytes, bb: relax.BlockBuilder) -> None:
        import tflite
        from tvm.relax.frontend.tflite import tflite_frontend as frontend

        self._frontend = frontend
        self._model = tflite.Model.GetRootAsModel(model_bytes, 0)
        self._subgraph = self._model.Subgraphs(0)
        self._table = frontend.ExprTable()
        self._converter = frontend.OperatorConverter(self._model, self._subgraph, self._table, bb)

    def supports(self, op_name: str) -> bool:
        return op_name in self._converter.convert_map

    def lower(self, ctx: LoweringContext, op: Operator) -> Lowered:
        for index in op.inputs:
            if index >= 0 and ctx.tensor(index).data is None:
                name = self._frontend.get_tensor_name(self._subgraph, index)
                self._table.set_expr(name, ctx.value(index), force_override=True)
        try:
            result: Any = self._converter.convert_map[op.name](op=self._subgraph.Operators(op.index))
            result = ctx.bb.normalize(result)
        except Exception as error:  # the frontend raises assertion, TVM and Python errors alike
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UnsupportedModelError(
                f"{op.name} #{op.index} has no integer kernel in edgeq and TVM's frontend could not lower it: {reason}"
            ) from None
        outputs = [result] if len(op.outputs) == 1 else [result[k] for k in range(len(op.outputs))]
        for index, value in zip(op.outputs, outputs):
            ctx.set(index, ctx.bb.emit(value) if not isinstance(value, relax.Var) else value)
        return Lowered(integer=False, macs=0, float_reason=FALLBACK_REASON)


def fallback_for(model_bytes: bytes | None, bb: relax.BlockBuilder) -> TvmOpFallback | None:
    """A fallback for the model, or None without the model's bytes."""
    return TvmOpFallback(model_bytes, bb) if model_bytes is not None else None
