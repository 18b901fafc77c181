"""edgeq's Relax CPU pipeline: the stock cpu_generic passes plus default schedules."""
from __future__ import annotations

import os
from typing import Callable, Sequence

import tvm
from tvm import relax, tirx
from tvm.relax.backend.cpu_generic import pipeline as generic

from .dotprod import PackForDotProduct
from .float_exact import SeparateFloatMultiplyAdd
from .fusion import legalize_and_fuse_passes
from .high_multiply import EvenOddHighMultiply
from .rules import DEFAULT_KNOBS, ScheduleKnobs, schedule_func
from .stack_buffers import KeepTileBuffersOnStack
from .target import cpu_info

_SCHEDULED = "tirx.is_scheduled"


def schedule_unscheduled(
    mod: tvm.IRModule, target: tvm.target.Target, knobs_for: Callable[[tirx.PrimFunc], ScheduleKnobs | None]
) -> tvm.IRModule:
    """``mod`` with each not-yet-scheduled PrimFunc that ``knobs_for`` gives knobs for scheduled
    with them and marked ``tirx.is_scheduled``: a new module when any changed (the caller's keeps
    its functions)."""
    info = cpu_info(target)
    updates = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or bool(func.attrs and func.attrs.get(_SCHEDULED, False)):
            continue
        knobs = knobs_for(func)
        scheduled = schedule_func(func, info, knobs) if knobs is not None else None
        if scheduled is not None:
            updates[gvar] = scheduled.with_attr(_SCHEDULED, True)
    if not updates:
        return mod
    mod = mod.clone()
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod


@tvm.transform.module_pass(opt_level=0, name="edgeq.ScheduleCPU")
class ScheduleCPU:
    """Schedule every not-yet-scheduled PrimFunc of a module for a CPU target (with ``knobs``' tiles)."""

    def __init__(self, target: tvm.target.Target, knobs: ScheduleKnobs = DEFAULT_KNOBS) -> None:
        self.target = target
        self.knobs = knobs

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return schedule_unscheduled(mod, self.target, lambda _func: self.knobs)


def kernel_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """Library dispatch, dot-product weight packing, legalization and fusion: the passes that make
    the PrimFuncs edgeq schedules (and that ``edgeq tune`` tunes)."""
    return generic.library_dispatch_passes(target) + [PackForDotProduct(target)] + legalize_and_fuse_passes()


def cpu_pipeline(
    target: tvm.target.Target,
    extra_passes: Sequence[tvm.transform.Pass] = (),
    *,
    tuning_db: str | os.PathLike[str] | None = None,
    fuse_float_multiply_add: bool = False,
    knobs: ScheduleKnobs = DEFAULT_KNOBS,
) -> tvm.transform.Pass:
    """The Relax pipeline of :func:`build_cpu`: legalize, fuse, schedule, lower to the VM.

    ``tuning_db`` (an ``edgeq tune`` database) puts its tuned kernels in place before edgeq's
    schedules take the rest, with ``knobs``' register tiles. ``extra_passes`` run right after the
    schedules. Float multiplies and adds are kept apart (see :mod:`.float_exact`) unless
    ``fuse_float_multiply_add``.
    """
    tuned = []
    if tuning_db is not None:
        from ..tune import apply_tuning_database

        tuned = [apply_tuning_database(tuning_db, target)]
    exact = [] if fuse_float_multiply_add else [SeparateFloatMultiplyAdd()]

    @tvm.transform.module_pass(opt_level=0, name="edgeq.CPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                kernel_passes(target)
                + tuned
                + [ScheduleCPU(target, knobs), *extra_passes]
                + exact
                + generic.dataflow_lower_passes(target)
                + generic.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


CPU_TIR_PIPELINE = "edgeq_cpu"
AVX512_TIR_PIPELINE = "edgeq_avx512"


def _cpu_tir_pipeline(*extra: tvm.transform.Pass):
    """TVM's TIR lowering, then ``extra`` passes and :class:`.KeepTileBuffersOnStack`."""
    lower, finalize_host, finalize_device = tvm.tirx.get_tir_pipeline("s_tir")
    passes = tvm.transform.Sequential([*extra, KeepTileBuffersOnStack()])

    @tvm.transform.module_pass(opt_level=0, name="edgeq.CPUTIRPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return passes(lower(mod))

    return _pipeline, finalize_host, finalize_device


tvm.tirx.compilation_pipeline.register_tir_pipeline(CPU_TIR_PIPELINE, _cpu_tir_pipeline)
# On AVX-512 also the even/odd ``pmuldq`` form of vectorized high multiplies.
tvm.tirx.compilation_pipeline.register_tir_pipeline(
    AVX512_TIR_PIPELINE, lambda: _cpu_tir_pipeline(EvenOddHighMultiply())
)


def tir_pipeline_for(target: tvm.target.Target) -> str:
    """The TIR lowering pipeline for a CPU target: TVM's, then per-tile buffers kept on the stack
    (:mod:`.stack_buffers`); on x86 with AVX-512 also the even/odd products (there they made VWW,
    ResNet and rps96 10-16% faster; with AVX2's 8 lanes LLVM's own sequence measured as fast or
    slightly faster)."""
    info = cpu_info(target)
    return AVX512_TIR_PIPELINE if not info.is_arm and info.vector_bits >= 512 else CPU_TIR_PIPELINE


def build_cpu(mod: tvm.IRModule, target: tvm.target.Target, **options) -> relax.Executable:
    """Compile a Relax module for a CPU ``target`` with edgeq's default schedules
    (``options``: those of :func:`cpu_pipeline`)."""
    return tvm.compile(
        mod, target=target, relax_pipeline=cpu_pipeline(target, **options), tir_pipeline=tir_pipeline_for(target)
    )
