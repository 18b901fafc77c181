"""Let FuseOps put padding, table lookups and tiling pools into the kernel that produces their input.

TVM's ``AnnotateTIROpPattern`` calls a pad with leading padding "injective" (its indices shift)
and a ``take`` "opaque" (a data-dependent read). FuseOps then leaves both as kernels of their
own, and every depthwise conv of an int8 network costs an extra pass over its input: the
producer writes the tensor, a pad kernel copies it into a bordered one. Both are elementwise in
their *input* (each output element reads at most one input element at the same or a shifted
position), so this pass labels them elementwise: they join the producer's kernel, where the
anchored schedule writes the conv's tiles straight into the padded buffer
(:func:`.rules.split_pad_fills`).

An int8 average pool whose windows tile its input (2x2 windows at stride 2, no padding) reads each
element exactly once: it too joins the kernel that produces its input, where the anchored schedule
pools each tile of the convolution's output as soon as it is requantized
(:func:`.rules._pool_in_tiles`) instead of writing the whole tensor for a pool kernel to read back.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, s_tir, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

_ELEMWISE = 0  # relax OpPatternKind.kElemWise
_INJECTIVE = 2
_OPAQUE = 8
IF_THEN_ELSE = ("tirx.if_then_else", "prim.if_then_else")  # the op's name, old and as TVM 0.27 registers it


def _children(node: object) -> list[object]:
    """Sub-expressions of a TIR expression or buffer store."""
    if isinstance(node, tvm.ir.Call):
        return list(node.args)
    if isinstance(node, (tirx.BufferStore, tvm.ir.expr.TensorLoad)):
        return [*node.indices, *([node.value] if isinstance(node, tirx.BufferStore) else [])]
    fields = ("a", "b", "value", "condition", "true_value", "false_value", "body", "base", "stride")
    return [c for c in (getattr(node, f, None) for f in fields) if isinstance(c, tvm.ir.Expr)]


def walk(node: object) -> list[object]:
    """All nodes of a TIR expression tree, pre-order."""
    out, stack = [], [node]
    while stack:
        current = stack.pop()
        out.append(current)
        stack.extend(_children(current))
    return out


def _single_block_value(func: tirx.PrimFunc) -> tuple[s_tir.SBlock, tvm.ir.Expr] | None:
    """The only block of ``func`` and the value it stores, if it has exactly one."""
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if len(blocks) != 1:
        return None
    block = sch.get(blocks[0])
    if not isinstance(block.body, tirx.BufferStore):
        return None
    return block, block.body.value


def is_pad_value(value: tvm.ir.Expr) -> bool:
    """Whether a stored value is ``if_then_else(in bounds, in[index], constant)``."""
    if not (isinstance(value, tvm.ir.Call) and getattr(value.op, "name", "") in IF_THEN_ELSE):
        return False
    _, inside, outside = value.args
    return isinstance(inside, tvm.ir.expr.TensorLoad) and isinstance(outside, (tirx.IntImm, tirx.FloatImm))


def is_constant_pad(func: tirx.PrimFunc) -> bool:
    """A pad kernel: out = if_then_else(in bounds, in[shifted index], constant)."""
    found = _single_block_value(func)
    return found is not None and is_pad_value(found[1])


def is_table_lookup(func: tirx.PrimFunc) -> bool:
    """A lookup kernel: out[i] = table[f(in[i])] with a 1-D table (``take`` on a constant)."""
    found = _single_block_value(func)
    if found is None:
        return False
    block, value = found
    if not isinstance(value, tvm.ir.expr.TensorLoad) or len(value.indices) != 1:
        return False
    return len(block.reads) == 2 and len(block.writes) == 1


def tiled_window(func: tirx.PrimFunc) -> tuple[int, int] | None:
    """(window rows, window columns) when ``func`` is an int8 pool's window sum whose windows
    tile its input (see :func:`tiled_window_block`), else None."""
    found = _single_block_value(func)
    return tiled_window_block(found[0]) if found is not None else None


def tiled_window_block(block: s_tir.SBlock) -> tuple[int, int] | None:
    """(window rows, window columns) when ``block`` is edgeq's ``window_sum`` (an int8 average
    pool's sums, NHWC) with windows that tile its input: stride equal to the window, no padding,
    every input element in exactly one window. None otherwise."""
    if block.name_hint != "window_sum" or len(block.reads) != 1 or len(block.writes) != 1:
        return None
    kinds = "".join("S" if iv.iter_type == tirx.IterVar.DataPar else "R" for iv in block.iter_vars)
    if kinds != "SSSSRR" or not isinstance(block.body, tirx.BufferStore):
        return None
    if any(_call_of(n, IF_THEN_ELSE) for n in walk(block.body.value)):
        return None  # padded taps
    try:
        window = tuple(int(iv.dom.extent) for iv in block.iter_vars[4:])
        in_shape = [int(d) for d in block.reads[0].source.shape]
        out_shape = [int(d) for d in block.writes[0].source.shape]
    except TypeError:  # symbolic
        return None
    if len(in_shape) != 4 or len(out_shape) != 4 or in_shape[0] != out_shape[0] or in_shape[3] != out_shape[3]:
        return None
    if (out_shape[1] * window[0], out_shape[2] * window[1]) != (in_shape[1], in_shape[2]):
        return None
    return window


def _call_of(node: object, names: tuple[str, ...]) -> bool:
    return isinstance(node, tvm.ir.Call) and getattr(node.op, "name", "") in names


@tvm.transform.module_pass(opt_level=0, name="edgeq.LabelFusableIntoProducers")
class LabelFusableIntoProducers:
    """Relabel constant pads, 1-D table lookups and tiling int8 pools as elementwise for FuseOps
    (after ``AnnotateTIROpPattern``): each joins the kernel that produces its input."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or func.attrs is None or "op_pattern" not in func.attrs:
                continue
            pattern = int(func.attrs["op_pattern"])
            if (
                (pattern == _INJECTIVE and is_constant_pad(func))
                or (pattern == _OPAQUE and is_table_lookup(func))
                or (pattern != _ELEMWISE and tiled_window(func) is not None)
            ):
                updates[gvar] = func.with_attr("op_pattern", _ELEMWISE)
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod


@mutator
class _ConstantAddFolder(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
        call = super().visit_call_(call)
        if getattr(call.op, "name", "") != "relax.add" or not isinstance(call.args[0], relax.Var):
            return call
        inner = self.lookup_binding(call.args[0])
        if not (isinstance(inner, relax.Call) and getattr(inner.op, "name", "") == "relax.add"):
            return call
        outer_constant, inner_constant = _int_constant(call.args[1]), _int_constant(inner.args[1])
        if outer_constant is None or inner_constant is None or outer_constant.dtype != inner_constant.dtype:
            return call
        shape = getattr(call.ty, "shape", None)
        x_shape = getattr(inner.args[0].ty, "shape", None)
        if shape is None or x_shape is None or any(not isinstance(d, tirx.IntImm) for d in (*shape, *x_shape)):
            return call
        shape, x_shape = tuple(int(d) for d in shape), tuple(int(d) for d in x_shape)
        total = inner_constant + outer_constant  # integer wrap-around: exact either way
        if np.broadcast_shapes(x_shape, total.shape) != shape or x_shape != shape:
            return call
        return relax.op.add(inner.args[0], relax.const(total, str(total.dtype)))


def _int_constant(expr: relax.Expr) -> np.ndarray | None:
    if isinstance(expr, tvm.ir.expr.GenericConst):
        values = expr.value.numpy()
        if np.issubdtype(values.dtype, np.integer):
            return values
    return None


@tvm.transform.module_pass(opt_level=0, name="edgeq.FoldConstantAdds")
class FoldConstantAdds:
    """``(x + c1) + c2`` -> ``x + (c1 + c2)`` for integer constants: a dot-product kernel's
    uint8 correction (-128 * sum(w)) and the layer's folded bias become one add per output."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        folder = _ConstantAddFolder(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                folder.builder_.update_func(gvar, folder.visit_expr(func))
        return relax.transform.DeadCodeElimination()(folder.builder_.get())


def legalize_and_fuse_passes() -> list[tvm.transform.Pass]:
    """cpu_generic's legalization and fusion, with pads, lookups and tiling pools fused into their
    producers."""
    return [
        # An alias binding (y = x) ends FuseOps' chain: an average pool's clamp stayed a kernel of its own.
        relax.transform.CanonicalizeBindings(),
        FoldConstantAdds(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        LabelFusableIntoProducers(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
