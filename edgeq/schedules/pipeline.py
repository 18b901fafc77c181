"""edgeq's Relax CPU pipeline: the stock cpu_generic passes plus default schedules."""
from __future__ import annotations

from typing import Sequence

import tvm
from tvm import relax, tirx
from tvm.relax.backend.cpu_generic import pipeline as generic

from .dotprod import PackForDotProduct
from .rules import schedule_func
from .target import cpu_info

_SCHEDULED = "tirx.is_scheduled"


@tvm.transform.module_pass(opt_level=0, name="edgeq.ScheduleCPU")
class ScheduleCPU:
    """Schedule every not-yet-scheduled PrimFunc of a module for a CPU target."""

    def __init__(self, target: tvm.target.Target) -> None:
        self.target = target

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        info = cpu_info(self.target)
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or bool(func.attrs and func.attrs.get(_SCHEDULED, False)):
                continue
            scheduled = schedule_func(func, info)
            if scheduled is not None:
                updates[gvar] = scheduled.with_attr(_SCHEDULED, True)
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod


def cpu_pipeline(target: tvm.target.Target, extra_passes: Sequence[tvm.transform.Pass] = ()) -> tvm.transform.Pass:
    """The Relax pipeline of :func:`build_cpu`: legalize, fuse, schedule, lower to the VM.

    ``extra_passes`` run right after the schedules (e.g. a tensorization pass for one ISA).
    """

    @tvm.transform.module_pass(opt_level=0, name="edgeq.CPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                generic.library_dispatch_passes(target)
                + [PackForDotProduct(target)]
                + generic.legalize_passes(target)
                + [ScheduleCPU(target), *extra_passes]
                + generic.dataflow_lower_passes(target)
                + generic.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


def build_cpu(mod: tvm.IRModule, target: tvm.target.Target) -> relax.Executable:
    """Compile a Relax module for a CPU ``target`` with edgeq's default schedules."""
    return tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target))
