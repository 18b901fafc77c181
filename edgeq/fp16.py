"""fp16 downcast: run a float Relax module's convs, matmuls and elementwise ops in float16.

``downcast_fp16`` wraps TVM's ``relax.transform.ToMixedPrecision(out_dtype="float16")``: weights
and activations between ops become float16 (half the weight bytes, fp16 arithmetic on devices
that have it: ARM with FP16 arithmetic, CUDA). ``main`` keeps its float32 (or integer) inputs and
outputs, so the manifest's tensor specs stay true. On a module from TVM's stock import of a
quantized model (dequantize -> float op -> quantize) the float ops become fp16 and the
dequantize/quantize stay float32 around them. CPUs without fp16 arithmetic (x86_64) convert
to float32 for each operation: correct, and not faster.
"""
from __future__ import annotations

from typing import Any

from .errors import EdgeqError


def downcast_fp16(mod: Any) -> Any:
    """The mixed-precision (float16) twin of the Relax IRModule ``mod``; ``main``'s signature is kept."""
    import tvm
    from tvm import relax

    original = mod["main"]
    seq = tvm.transform.Sequential([
        relax.transform.ConvertToDataflow(),  # the pass only rewrites dataflow blocks
        _clip_bounds_as_tensors(),
        relax.transform.ToMixedPrecision(out_dtype="float16"),
        relax.transform.FoldConstant(),  # float32 weights -> float16 constants, once, at compile time
    ])
    try:
        out = seq(mod)
    except Exception as error:  # noqa: BLE001 - TVM's pass reports unsupported graphs as assorted errors
        lines = str(error).strip().splitlines()
        raise EdgeqError(f"the fp16 downcast (TVM ToMixedPrecision) cannot convert this model: "
                         f"{lines[-1] if lines else type(error).__name__}; package it without --quantize fp16") from None
    main = out["main"]
    if [_dtypes(p.ty) for p in main.params] != [_dtypes(p.ty) for p in original.params]:
        raise EdgeqError("fp16 downcast changed the model's input dtypes")  # not with fp16_input_names=None
    if _dtypes(main.ret_ty) != _dtypes(original.ret_ty):
        out["main"] = _cast_outputs(main, original.ret_ty)
    return out


def _dtypes(ty: Any) -> Any:
    fields = getattr(ty, "fields", None)
    if fields is not None:
        return tuple(_dtypes(f) for f in fields)
    return getattr(ty, "dtype", None)


def _cast_outputs(func: Any, want: Any) -> Any:
    """``func`` with its result cast back to the dtypes of ``want`` (a tensor or tuple type)."""
    from tvm import relax

    bindings = []

    def cast(expr: Any, ty: Any, want_ty: Any) -> Any:
        fields = getattr(want_ty, "fields", None)
        if fields is not None:
            items = []
            for i, field_ty in enumerate(fields):
                item = relax.Var(f"fp16_out{len(bindings)}", ty.fields[i])
                bindings.append(relax.VarBinding(item, relax.TupleGetItem(expr, i)))
                items.append(cast(item, ty.fields[i], field_ty))
            return relax.Tuple(items)
        if getattr(ty, "dtype", None) == want_ty.dtype:
            return expr
        var = relax.Var(f"fp16_out{len(bindings)}", want_ty)
        bindings.append(relax.VarBinding(var, relax.op.astype(expr, want_ty.dtype)))
        return var

    body = func.body
    result = cast(body.body, func.ret_ty, want)
    new_body = relax.SeqExpr([*body.blocks, relax.BindingBlock(bindings)], result)
    return relax.Function(func.params, new_body, want, func.is_pure, func.attrs)


def _clip_bounds_as_tensors() -> Any:
    """A pass writing ``clip(x, lo, hi)`` (scalar bounds, as TVM's ONNX importer emits for ReLU6 /
    hard-swish) as ``minimum(maximum(x, lo), hi)`` with tensor bounds: ToMixedPrecision accepts
    only tensor arguments."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    clip = tvm.ir.Op.get("relax.clip")

    @mutator
    class Rewriter(PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not (isinstance(call, relax.Call) and call.op.same_as(clip)):
                return call
            x, lo, hi = call.args
            dtype = x.ty.dtype

            def bound(value: Any) -> Any:  # a PrimValue holding an IntImm / FloatImm
                number = value.value
                return relax.const(float(getattr(number, "value", number)), dtype)

            return relax.op.minimum(relax.op.maximum(x, bound(lo)), bound(hi))

    @tvm.transform.module_pass(opt_level=0, name="edgeq.ClipBoundsAsTensors")
    def rewrite(mod: Any, _ctx: Any) -> Any:
        rewriter = Rewriter(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
        return rewriter.builder_.get()

    return rewrite
