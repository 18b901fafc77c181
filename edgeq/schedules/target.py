"""What the schedules need to know about a CPU target: vector width, registers, cores."""
from __future__ import annotations

import os
from dataclasses import dataclass

import tvm

from .dotprod import DotProduct, dot_products

# x86 CPU names (LLVM spelling) whose vector unit is AVX-512 (512 bit) or AVX2 (256 bit).
AVX512_CPUS = (
    "skylake-avx512", "cascadelake", "cooperlake", "cannonlake", "icelake", "tigerlake",
    "rocketlake", "sapphirerapids", "emeraldrapids", "graniterapids", "znver4", "znver5",
    "x86-64-v4",
)
AVX2_CPUS = (
    "haswell", "broadwell", "skylake", "kabylake", "coffeelake", "cometlake", "alderlake",
    "raptorlake", "meteorlake", "arrowlake", "lunarlake", "gracemont", "znver1", "znver2",
    "znver3", "x86-64-v3", "core-avx2",
)


@dataclass(frozen=True)
class CpuInfo:
    """Vector width in bits, number of vector registers and of cores of a CPU target."""

    vector_bits: int
    vector_regs: int
    num_cores: int
    is_arm: bool
    dots: tuple[DotProduct, ...] = ()  # integer dot-product instructions, widest first

    def lanes(self, dtype: str) -> int:
        """Number of ``dtype`` elements in one vector register."""
        return max(1, self.vector_bits // tvm.DataType(dtype).bits)


def cpu_info(target: tvm.target.Target) -> CpuInfo:
    """Derive :class:`CpuInfo` from an ``llvm`` target (``mtriple``, ``mcpu``, ``mattr``, ``num-cores``)."""
    attrs = target.attrs
    triple = str(attrs.get("mtriple", "") or "")
    mcpu = str(attrs.get("mcpu", "") or "")
    mattr = [str(a) for a in (attrs.get("mattr") or [])]
    cores = int(attrs.get("num-cores", 0) or 0) or (os.cpu_count() or 1)
    dots = dot_products(target)
    if triple.startswith(("aarch64", "arm64", "arm", "thumb")) or bool(attrs.get("feature.is_aarch64", False)):
        return CpuInfo(vector_bits=128, vector_regs=32, num_cores=cores, is_arm=True, dots=dots)
    if mcpu.startswith(AVX512_CPUS) or "+avx512f" in mattr:
        return CpuInfo(vector_bits=512, vector_regs=32, num_cores=cores, is_arm=False, dots=dots)
    if mcpu.startswith(AVX2_CPUS) or "+avx2" in mattr:
        return CpuInfo(vector_bits=256, vector_regs=16, num_cores=cores, is_arm=False, dots=dots)
    return CpuInfo(vector_bits=128, vector_regs=16, num_cores=cores, is_arm=False, dots=dots)
