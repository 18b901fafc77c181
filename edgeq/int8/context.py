"""What an op lowering sees: the graph, the Relax block builder, and the values computed so far."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tvm import relax

from ..errors import UnsupportedModelError
from .graph import Graph, Operator, Tensor
from .relax_int import dtype_of, shape_of

ACTIVATIONS = {0: "NONE", 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6", 4: "TANH", 5: "SIGN_BIT"}


@dataclass(frozen=True)
class Lowered:
    """How one TFLite op was lowered: in integer arithmetic, or in float (with the reason)."""

    integer: bool = True
    macs: int = 0
    float_reason: str = ""


@dataclass
class LoweringContext:
    bb: relax.BlockBuilder
    graph: Graph
    values: dict[int, relax.Expr] = field(default_factory=dict)
    kernels: str = "reference"  # "reference" | "optimized-x86": whose rounding to reproduce

    def tensor(self, index: int) -> Tensor:
        return self.graph.tensors[index]

    def value(self, index: int) -> relax.Expr:
        """The Relax value of a tensor: computed earlier, or its constant data."""
        if index in self.values:
            return self.values[index]
        tensor = self.tensor(index)
        if tensor.data is None:
            raise UnsupportedModelError(f"tensor {tensor.name} is read before any op computes it")
        return relax.const(tensor.data, tensor.dtype)

    def set(self, index: int, expr: relax.Expr) -> None:
        """Bind an op output, reshaping to the shape TFLite records when Relax inferred another."""
        tensor = self.tensor(index)
        shape = shape_of(expr)
        if shape != tensor.shape and int(np.prod(shape)) == int(np.prod(tensor.shape)):
            expr = self.bb.emit(relax.op.reshape(expr, tensor.shape))
        elif shape != tensor.shape:
            raise UnsupportedModelError(f"{tensor.name}: lowered shape {shape} differs from TFLite's {tensor.shape}")
        if dtype_of(expr) != tensor.dtype:
            raise UnsupportedModelError(
                f"{tensor.name}: lowered dtype {dtype_of(expr)} differs from TFLite's {tensor.dtype}"
            )
        self.values[index] = expr


def activation_of(op: Operator) -> str:
    """The fused activation of an op's options ("NONE" when the op has none)."""
    options = op.options
    if options is None or not hasattr(options, "FusedActivationFunction"):
        return "NONE"
    return ACTIVATIONS.get(options.FusedActivationFunction(), "UNKNOWN")


def require_quantized(ctx: LoweringContext, op: Operator, *indices: int) -> None:
    """Raise unless every named tensor is an int8/uint8 tensor with per-tensor quantization."""
    for index in indices:
        tensor = ctx.tensor(index)
        if tensor.dtype not in ("int8", "uint8") or tensor.quant is None:
            raise UnsupportedModelError(
                f"{op.name} #{op.index}: tensor {tensor.name} is {tensor.dtype} without 8-bit quantization; "
                "the integer importer lowers int8/uint8 quantized ops only"
            )
