"""ARM int8 dot-product schedule rule: tensorize int8 conv2d / matmul reductions with ``sdot``.

Why this exists: with ``mattr +dotprod`` (Cortex-A76, Raspberry Pi 5) LLVM emits ``sdot`` only
where it auto-vectorizes along the *reduction* axis (seen in small matmuls whose reduction is
the innermost serial loop). edgeq's default CPU schedules (``edgeq.schedules``) vectorize the
*output-channel* axis of conv2d with int32 accumulators, so LLVM widens and multiply-adds
(``smull``/``smlal``) and never forms ``sdot`` for the convolutions, which hold nearly all the
multiply-adds. To use ``sdot`` the innermost block must be exactly TVM's tensor intrinsic
``dot_4x4_i8i8s32_sdot`` (``tvm.s_tir.tensor_intrin.arm_cpu``)::

    for i in 0..4:          # 4 output channels, one int32 lane each
      for k in 0..4:        # 4 consecutive input channels (the reduction)
        C[i] += int32(A[k]) * int32(B[i, k])

with A (4 int8), B (4x4 int8, one row per output channel) and C (4 int32) contiguous.
Activations are NHWC, so 4 consecutive input channels are contiguous already, and so are 4
output channels of the accumulator. The weights (``W[..., c, f]``: HWIO for conv2d, KN for
matmul, as the integer lowering emits them) are repacked once per call into
``W'[..., c // 4, f, c % 4]`` (a few KB, negligible next to the convolution).

Hook for ``edgeq.schedules`` (not called there yet)::

    from edgeq.schedules_arm import schedule_dotprod, target_has_dotprod
    # in rules._anchored, after sch.decompose_reduction(anchor, ...):
    if info.is_arm and target_has_dotprod(target):
        schedule_dotprod(sch, anchor)   # the update block; False = not applicable, sch unchanged

``schedule_dotprod`` returns False without touching ``sch`` when the block does not fit:
A and W must be ``int8`` (a ``uint8`` x ``int8`` product needs ``usdot``, Armv8.6 i8mm, which the
Cortex-A76 lacks; ``uint8`` x ``uint8`` would need ``udot``), C ``int32``; the innermost loop must
run over output channels and a loop above it over input channels, both multiples of 4 (the first
conv of an RGB model, 3 channels, and depthwise convs keep their NEON code). Integer addition is
exact, so the tensorized kernel is bit-identical to the loop it replaces.

Until the hook is wired, :class:`DotProdARM` applies the rule as a module pass to every already
scheduled PrimFunc, and :func:`build_cpu_dotprod` builds with edgeq's CPU pipeline plus this pass.
"""
from __future__ import annotations

import logging
from typing import Any

import tvm
from tvm import s_tir, tirx
from tvm.ir.expr import TensorLoad

log = logging.getLogger(__name__)

SDOT_INTRIN = "dot_4x4_i8i8s32_sdot"
LANES = 4  # int32 lanes of a 128-bit NEON register = rows of the 4x4 intrinsic
DEPTH = 4  # int8 products summed into each lane by one sdot
_SCHEDULED = "tirx.is_scheduled"


def target_has_dotprod(target: Any) -> bool:
    """Whether an ``llvm`` target is AArch64 with the dot-product extension (``+dotprod``)."""
    attrs = target.attrs
    triple = str(attrs.get("mtriple", "") or "")
    mattr = [str(a) for a in (attrs.get("mattr") or [])]
    return triple.startswith(("aarch64", "arm64")) and ("+dotprod" in mattr or "+v8.4a" in mattr)


def _realize_of(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> Any:
    """The SBlockRealize of ``block`` (its loop bindings): the body of its innermost loop."""
    loops = sch.get_loops(block)
    body = sch.get(loops[-1]).body if loops else None
    if isinstance(body, s_tir.SBlockRealize) and body.block.same_as(sch.get(block)):
        return body
    return None


def _int(expr: Any) -> int | None:
    return int(expr) if isinstance(expr, tirx.IntImm) else None


def _match(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> tuple[Any, Any, int] | None:
    """(output-channel loop, input-channel loop, weight read index) if ``block`` fits sdot."""
    stmt = sch.get(block)
    store = stmt.body
    if not isinstance(store, tirx.BufferStore) or len(stmt.writes) != 1 or store.buffer.dtype != "int32":
        return None
    value = store.value  # C[...] + int32(A[...]) * int32(W[...])
    if not (isinstance(value, tirx.Add) and isinstance(value.b, tirx.Mul)):
        return None
    if not (isinstance(value.a, TensorLoad) and value.a.source.same_as(store.buffer)):
        return None
    loads = []
    for operand in (value.b.a, value.b.b):
        if not (isinstance(operand, tirx.Cast) and isinstance(operand.value, TensorLoad)):
            return None
        loads.append(operand.value)
    act, weight = loads
    if act.source.dtype != "int8" or weight.source.dtype != "int8":
        return None
    out_var, red_var = store.indices[-1], act.indices[-1]
    if not (isinstance(out_var, tirx.Var) and isinstance(red_var, tirx.Var)):
        return None
    if len(weight.indices) < 2 or not (weight.indices[-1].same_as(out_var) and weight.indices[-2].same_as(red_var)):
        return None
    if any(i.same_as(red_var) for i in store.indices):
        return None  # depthwise-like: the "reduction" channel is also an output axis
    realize = _realize_of(sch, block)
    if realize is None:
        return None
    loops = sch.get_loops(block)
    loop_vars = [sch.get(loop).loop_var for loop in loops]
    out_loop = red_loop = None
    for iv, bound in zip(stmt.iter_vars, realize.iter_values):
        if iv.var.same_as(red_var):
            if iv.iter_type != tirx.IterVar.CommReduce or not isinstance(bound, tirx.Var):
                return None
            red_loop = next((lp for lp, v in zip(loops, loop_vars) if v.same_as(bound)), None)
        elif iv.var.same_as(out_var):
            # innermost loop, unit stride: v_f = ... + f_inner
            if not (isinstance(bound, tirx.Var) and bound.same_as(loop_vars[-1])) and not (
                isinstance(bound, tirx.Add) and isinstance(bound.b, tirx.Var) and bound.b.same_as(loop_vars[-1])
            ):
                return None
            out_loop = loops[-1]
    if out_loop is None or red_loop is None or red_loop.same_as(out_loop):
        return None
    out_extent, red_extent = _int(sch.get(out_loop).extent), _int(sch.get(red_loop).extent)
    if not out_extent or not red_extent or out_extent % LANES or red_extent % DEPTH:
        return None
    read_index = next((i for i, r in enumerate(stmt.reads) if r.source.same_as(weight.source)), None)
    if read_index is None:
        return None
    return out_loop, red_loop, read_index


def schedule_dotprod(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> bool:
    """Tensorize ``block`` (the update block of an int8 conv2d / matmul) with ``sdot``.

    Returns True when applied; False (``sch`` unchanged) when the block does not fit.
    """
    import tvm.s_tir.tensor_intrin.arm_cpu  # noqa: F401  registers dot_4x4_i8i8s32_sdot

    matched = _match(sch, block)
    if matched is None:
        return False
    out_loop, red_loop, read_index = matched
    # Try on a copy first (random variables stay valid in a copy): a tensorize that fails
    # half-way must leave ``sch`` untouched.
    trial = sch.copy()
    try:
        _apply(trial, block, out_loop, red_loop, read_index)
    except (RuntimeError, ValueError, s_tir.ScheduleError) as error:
        log.debug("sdot not applied to %s: %s", sch.get(block).name_hint, error)
        return False
    _apply(sch, block, out_loop, red_loop, read_index)
    return True


def _apply(sch, block, out_loop, red_loop, read_index) -> None:
    ndim = len(sch.get(block).reads[read_index].source.shape)
    packed = sch.cache_read(block, read_index, "global")  # at the root: once per call

    def pack(*idx):
        *lead, c, f = idx
        return (*lead, c // DEPTH, f, c % DEPTH)

    sch.transform_layout(packed, ("write", 0), tirx.IndexMap.from_func(pack, ndim=ndim, index_dtype="int64"))
    f_outer, f_inner = sch.split(out_loop, [None, LANES])
    _, c_inner = sch.split(red_loop, [None, DEPTH])
    sch.reorder(f_outer, f_inner, c_inner)
    if (_int(sch.get(f_outer).extent) or 0) > 1:
        sch.unroll(f_outer)
    sch.tensorize(f_inner, SDOT_INTRIN)


def tensorize_dotprod(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """``func`` with every fitting int8 update block tensorized with sdot; None if none fits."""
    sch = s_tir.Schedule(func)
    applied = 0
    for block in sch.get_child_blocks(sch.get_sblock("root")) if _has_root(sch) else []:
        if any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars):
            applied += bool(schedule_dotprod(sch, block))
    return sch.mod["main"] if applied else None


def _has_root(sch: s_tir.Schedule) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except (RuntimeError, ValueError, s_tir.ScheduleError):
        return False


@tvm.transform.module_pass(opt_level=0, name="edgeq.DotProdARM")
class DotProdARM:
    """Tensorize int8 conv2d / matmul PrimFuncs with sdot on AArch64 targets with +dotprod."""

    def __init__(self, target: tvm.target.Target) -> None:
        self.target = target

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if not target_has_dotprod(self.target):
            return mod
        updates = {}
        for gvar, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc):
                try:
                    new = tensorize_dotprod(func)
                except (RuntimeError, ValueError) as error:
                    log.debug("sdot pass skipped %s: %s", gvar.name_hint, error)
                    new = None
                if new is not None:
                    updates[gvar] = new.with_attr(_SCHEDULED, True)
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod


def cpu_pipeline_dotprod(target: tvm.target.Target) -> tvm.transform.Pass:
    """edgeq's CPU pipeline (:func:`edgeq.schedules.cpu_pipeline`) with :class:`DotProdARM` after the schedules."""
    from .schedules import cpu_pipeline

    return cpu_pipeline(target, extra_passes=[DotProdARM(target)])


def build_cpu_dotprod(mod: tvm.IRModule, target: tvm.target.Target) -> Any:
    """Like :func:`edgeq.schedules.build_cpu`, with int8 reductions tensorized with sdot."""
    return tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline_dotprod(target))
