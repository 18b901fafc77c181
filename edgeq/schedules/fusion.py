"""Let FuseOps put padding and table lookups into the kernel that produces their input.

TVM's ``AnnotateTIROpPattern`` calls a pad with leading padding "injective" (its indices shift)
and a ``take`` "opaque" (a data-dependent read). FuseOps then leaves both as kernels of their
own, and every depthwise conv of an int8 network costs an extra pass over its input: the
producer writes the tensor, a pad kernel copies it into a bordered one. Both are elementwise in
their *input* (each output element reads at most one input element at the same or a shifted
position), so this pass labels them elementwise: they join the producer's kernel, where the
anchored schedule writes the conv's tiles straight into the padded buffer
(:func:`.rules.split_pad_fills`).
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


@tvm.transform.module_pass(opt_level=0, name="edgeq.LabelPadsAndLookupsElementwise")
class LabelPadsAndLookupsElementwise:
    """Relabel constant pads and 1-D table lookups as elementwise for FuseOps (after
    ``AnnotateTIROpPattern``)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or func.attrs is None or "op_pattern" not in func.attrs:
                continue
            pattern = int(func.attrs["op_pattern"])
            if (pattern == _INJECTIVE and is_constant_pad(func)) or (pattern == _OPAQUE and is_table_lookup(func)):
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
    """cpu_generic's legalization and fusion, with pads and lookups fused into their producers."""
    return [
        # An alias binding (y = x) ends FuseOps' chain: an average pool's clamp stayed a kernel of its own.
        relax.transform.CanonicalizeBindings(),
        FoldConstantAdds(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        LabelPadsAndLookupsElementwise(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
