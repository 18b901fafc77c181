"""Kernel fusion beyond FuseOps' rules: padding, table lookups and tiling pools join the kernel
that produces their input; a float input's QUANTIZE joins the convolution that reads it.

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


def has_costly_call(node: object) -> bool:
    """Whether a TIR expression calls anything but ``if_then_else`` (trunc, round, exp, ...): work
    per element that inlining would repeat."""
    return any(isinstance(n, tvm.ir.Call) and getattr(n.op, "name", "") not in IF_THEN_ELSE for n in walk(node))


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


_ANCHOR_PREFIXES = ("dot_conv2d", "dot_depthwise", "conv2d")


def _call_tirs(func: relax.Function) -> list[relax.Call]:
    """The ``call_tir`` calls of a fused (Primitive) function's body, in order."""
    calls = []
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.call_tir":
                calls.append(value)
    return calls


def _is_costly_prologue(mod: tvm.IRModule, func: relax.Function) -> bool:
    """A fused group of elementwise/injective kernels that does real arithmetic per element
    (a rounding division: QUANTIZE of a float input), not just a copy, cast or pad."""
    costly = False
    for call in _call_tirs(func):
        prim = mod[call.args[0]]
        if int(prim.attrs.get("op_pattern", _OPAQUE)) > _INJECTIVE:
            return False
        found = _single_block_value(prim)
        costly = costly or (found is not None and has_costly_call(found[1]))
    return costly


def _feeds_anchor_data(mod: tvm.IRModule, func: relax.Function) -> bool:
    """Whether ``func``'s first parameter is the data input of its first call, a convolution."""
    calls = _call_tirs(func)
    if not calls or not func.params:
        return False
    name = calls[0].args[0].name_hint
    args = calls[0].args[1].fields if hasattr(calls[0].args[1], "fields") else []
    return name.startswith(_ANCHOR_PREFIXES) and len(args) > 0 and args[0].same_as(func.params[0])


@tvm.transform.module_pass(opt_level=0, name="edgeq.FuseInputPrologue")
class FuseInputPrologue:
    """Put a kernel that quantizes a float input (a rounding division per element) into the
    convolution that reads it, between FuseOps and FuseTIR.

    FuseOps fuses elementwise work only into the kernel that *produces* its input; a float input's
    QUANTIZE (rps96's first op) stayed a kernel of its own: one more call, one more wake-up of the
    worker threads, for a few microseconds of work. In the convolution's kernel the anchored
    schedule computes it per thread, for the rows that thread's tiles read
    (:func:`.rules._prologue_per_thread`). rps96 (a 96 x 96 float image): 17.7 -> 15.9 us per
    inference on the 2-core development machine.
    """

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        main = next((f for g, f in mod.functions_items() if g.name_hint == "main"), None)
        if not isinstance(main, relax.Function):
            return mod
        bindings = [b for block in main.body.blocks for b in block.bindings]
        uses: dict[object, int] = {}
        for binding in bindings:
            for node in _relax_args(binding.value):
                if isinstance(node, relax.Var):
                    uses[node] = uses.get(node, 0) + 1
        merges = {}
        for first, second in zip(bindings, bindings[1:]):
            a, b = first.value, second.value
            if not (_calls_primitive(mod, a) and _calls_primitive(mod, b)):
                continue
            if uses.get(first.var, 0) != 1 or not b.args or not b.args[0].same_as(first.var):
                continue
            if not (_is_costly_prologue(mod, mod[a.op]) and _feeds_anchor_data(mod, mod[b.op])):
                continue
            merges[second.var] = (first, second)
        if not merges:
            return mod
        mod = mod.clone()
        for first, second in merges.values():
            mod = _merge(mod, first, second)
        return relax.transform.DeadCodeElimination()(mod)


def _relax_args(value: relax.Expr) -> list[relax.Expr]:
    if isinstance(value, relax.Call):
        return list(value.args)
    if isinstance(value, relax.Tuple):
        return list(value.fields)
    return []


def _calls_primitive(mod: tvm.IRModule, value: relax.Expr) -> bool:
    if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.GlobalVar)):
        return False
    func = mod[value.op]
    return isinstance(func, relax.Function) and func.attrs is not None and bool(func.attrs.get("Primitive", False))


def _merge(mod: tvm.IRModule, first: relax.VarBinding, second: relax.VarBinding) -> tvm.IRModule:
    """``mod`` with ``second = g2(first, ...)`` calling one fused function that runs ``first``'s
    group and then ``second``'s."""
    g1, g2 = first.value.op, second.value.op
    f1, f2 = mod[g1], mod[g2]
    params = [relax.Var(p.name, p.ty) for p in (*f1.params, *f2.params[1:])]
    builder = relax.BlockBuilder()
    with builder.function("merged", params, attrs={"Primitive": True}, private=True):
        with builder.dataflow():
            prologue = builder.emit(relax.Call(g1, params[: len(f1.params)]))
            out = builder.emit_output(relax.Call(g2, [prologue, *params[len(f1.params):]]))
        builder.emit_func_output(out)
    merged = builder.get()["merged"].inline_functions({g1: f1, g2: f2})

    @mutator
    class _Redirect(PyExprMutator):
        def visit_var_binding_(self, binding: relax.VarBinding) -> None:  # noqa: D102
            if binding.var.same_as(second.var):
                call = relax.Call(merged_var, [*first.value.args, *second.value.args[1:]])
                self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(call)))
                return
            super().visit_var_binding_(binding)

    redirect = _Redirect(mod)
    merged_var = redirect.builder_.add_func(merged, f"{g1.name_hint}_{g2.name_hint.removeprefix('fused_')}")
    main_var = mod.get_global_var("main")
    redirect.builder_.update_func(main_var, redirect.visit_expr(mod[main_var]))
    return redirect.builder_.get()


def legalize_and_fuse_passes() -> list[tvm.transform.Pass]:
    """cpu_generic's legalization and fusion, with pads, lookups and tiling pools fused into their
    producers and a float input's QUANTIZE into the convolution that reads it."""
    return [
        # An alias binding (y = x) ends FuseOps' chain: an average pool's clamp stayed a kernel of its own.
        relax.transform.CanonicalizeBindings(),
        FoldConstantAdds(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        LabelFusableIntoProducers(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        FuseInputPrologue(),
        relax.transform.FuseTIR(),
    ]
