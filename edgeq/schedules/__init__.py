"""Default (untuned) CPU schedules for Relax modules: threads, vectors and register tiles."""
from .pipeline import ScheduleCPU, build_cpu, cpu_pipeline, kernel_passes
from .target import CpuInfo, cpu_info

__all__ = ["CpuInfo", "ScheduleCPU", "build_cpu", "cpu_info", "cpu_pipeline", "kernel_passes"]
