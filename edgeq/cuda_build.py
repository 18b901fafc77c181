"""Host side: compile a Relax module for an NVIDIA GPU and its kernels for the device's chip.

TVM 0.27 exports a CUDA library that holds CUDA C++ *source*; the runtime compiles it when the
library loads, through the global function ``tvm_callback_cuda_compile``. A device has no
compiler, so edgeq compiles the kernels here with ``nvcc`` (a fatbin with the chip's machine
code plus PTX for newer chips) and the bundle carries them, keyed by the sha256 of the source
the runtime will hand to that callback (see ``edgeq.runtime.cuda``).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import EdgeqError, MissingDependencyError

Progress = Callable[[str], None]
_DEBUG = bool(os.environ.get("EDGEQ_DEBUG_SCHEDULE"))
# EDGEQ_GPU_WARP_REDUCTION=0 keeps every reduction serial in one thread (for comparisons).
_WARP_REDUCTIONS = os.environ.get("EDGEQ_GPU_WARP_REDUCTION", "1") != "0"

# Where the CUDA toolkit installs nvcc by default.
DEFAULT_NVCC = "/usr/local/cuda/bin/nvcc"
# Kernels live in the bundle under this folder, one fatbin per CUDA source.
KERNEL_DIR = "model/cuda"
# The CUDA major version the bundled runtime (libtvm_runtime_cuda -> libcudart.so.13) needs.
CUDA_RUNTIME_MAJOR = 13
# The oldest NVIDIA driver branch that supports CUDA 13.
MIN_DRIVER = "580"


@dataclass(frozen=True)
class CudaKernels:
    """Compiled kernels of one library: {sha256 of the CUDA source: fatbin bytes}."""

    fatbins: dict[str, bytes]
    arch: str  # "sm_90"
    compiler: str  # e.g. "nvcc 13.0.88"
    kernel_count: int


def schedule_gpu(rules: Sequence[Any] | None = None) -> Any:
    """A module pass scheduling every unscheduled TIR function for the GPU.

    Elementwise producers are first inlined only where that keeps expressions small (the CPU
    schedules' rule: the fixed-point chains of integer requantization read values several
    times, and unbounded inlining grows them exponentially - dlight's own rules never finish
    on them). A function left with one kernel (plus its output epilogue) gets the first dlight
    rule that fits; a rule that fails is skipped. Otherwise each remaining block becomes its
    own kernel, its spatial loops spread over thread blocks.
    """
    import tvm
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight as dl

    from .schedules.rules import _is_reduction, inline_injective

    if rules is None:
        # dlight's GEMV rule is left out: it does not terminate on some integer kernels.
        rules = (dl.gpu.Matmul(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())

    @tvm.transform.module_pass(opt_level=0, name="edgeq.ScheduleGPU")
    def _schedule(mod: Any, _ctx: Any) -> Any:
        target = tvm.target.Target.current(allow_none=False)
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", 0) == 1:
                continue
            sch = s_tir.Schedule(func)
            inline_injective(sch)
            scheduled = None
            blocks = sch.get_child_blocks(sch.get_sblock("root"))
            # dlight's rules inline whatever is left: safe for one block, or for a reduction
            # followed by its epilogue (inlined into the reduction's write-back). Small
            # reductions (depthwise windows) are faster one output per thread than with
            # dlight's one-block-per-output reduction rules.
            fits_dlight = len(blocks) == 1 or (len(blocks) == 2 and _is_reduction(sch, blocks[0]))
            # dlight's Matmul rule takes 8-bit matmuls to a tensor-core path that TVM 0.27 fails
            # to lower (software pipelining of wmma fragments), and its reduction rules give
            # each output a whole thread block: 8-bit reductions take the warp-per-output path.
            if fits_dlight and not 0 < _reduction_size(sch) <= SMALL_REDUCTION and not _reads_8bit(sch):
                scheduled = _first_rule(sch.mod["main"], target, rules, gvar.name_hint)
            if scheduled is None:
                if _DEBUG:
                    print("schedule", gvar.name_hint, "blockwise", flush=True)
                _bind_blockwise(sch)
                scheduled = sch.mod["main"]
            updates[gvar] = scheduled.with_attr("tirx.is_scheduled", True)
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod

    return _schedule


def _reads_8bit(sch: Any) -> bool:
    """Whether a reduction block of the function reads int8/uint8 data."""
    from .schedules.rules import _is_reduction

    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if _is_reduction(sch, block):
            if any(str(region.source.dtype) in ("int8", "uint8") for region in sch.get(block).reads):
                return True
    return False


def _first_rule(func: Any, target: Any, rules: Sequence[Any], name: str) -> Any:
    for rule in rules:
        if _DEBUG:
            print("schedule", name, type(rule).__name__, flush=True)
        try:
            space = rule.apply(func, target, False)
        except Exception:  # the rule does not fit this function; try the next one
            continue
        if space is not None:
            schedule = space[0] if isinstance(space, (list, tuple)) else space
            return schedule.mod["main"]
    return None


# Reductions over at most this many elements (depthwise windows, small pools) run one output per
# thread; larger ones (pointwise convs, dense layers) one output per warp.
SMALL_REDUCTION = 64


def _loops_size(sch: Any, loops: Sequence[Any]) -> int:
    """Product of the loops' extents (a symbolic extent counts as huge)."""
    from .schedules.rules import _int_extent

    size = 1
    for loop in loops:
        size *= _int_extent(sch, loop) or 1 << 20
    return size


def _reduction_size(sch: Any) -> int:
    """Largest reduction (product of reduction loop extents) of any block; 0 if none."""
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    sizes = [
        _loops_size(sch, [loop for loop, kind in zip(sch.get_loops(info.block_rv), info.dom_kind()) if kind == "R"])
        for info in normalize_prim_func(sch) or []
        if "R" in info.dom_kind()
    ]
    return max(sizes, default=0)


def _spatial_size(sch: Any, block: Any) -> int:
    """Number of points of a block's spatial iteration domain."""
    size = 1
    for var in sch.get(block).iter_vars:
        if var.iter_type == 0:  # DataPar
            extent = var.dom.extent
            size *= int(extent) if hasattr(extent, "value") else 1 << 30
    return size


def _bind_blockwise(sch: Any, threads: int = 256, warps_per_block: int = 8) -> None:
    """One kernel per block. Spatial loops are fused and spread over the grid; a small reduction
    runs serially in its thread (which then also computes the output's elementwise epilogue), a
    large one across the 32 lanes of a warp (one output per warp, combined by TVM's
    cross-thread reduction)."""
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    infos = normalize_prim_func(sch)
    if infos is None:
        raise EdgeqError("a fused kernel has a shape edgeq cannot schedule for the GPU")
    serial_reductions = []
    for info in infos:
        block = info.block_rv
        loops = sch.get_loops(block)
        if any(sch.get(loop).thread_binding is not None for loop in loops):
            continue
        groups: dict[str, list[Any]] = {"S": [], "R": [], "O": []}
        for loop, kind in zip(loops, info.dom_kind()):
            groups[kind].append(loop)
        if not groups["S"]:
            groups["S"].append(sch.add_unit_loop(block))
        sch.reorder(*groups["S"], *groups["R"], *groups["O"])
        size = _loops_size(sch, groups["R"])
        spatial = sch.fuse(*groups["S"])
        if _WARP_REDUCTIONS and groups["R"] and not groups["O"] and size > SMALL_REDUCTION:
            reduction = sch.fuse(*groups["R"])
            outer, inner = sch.split(spatial, factors=[None, warps_per_block])
            sch.bind(outer, "blockIdx.x")
            sch.bind(inner, "threadIdx.y")
            _, lane = sch.split(reduction, factors=[None, 32])
            sch.bind(lane, "threadIdx.x")
            continue
        outer, inner = sch.split(spatial, factors=[None, threads])
        sch.bind(outer, "blockIdx.x")
        sch.bind(inner, "threadIdx.x")
        if groups["R"]:
            serial_reductions.append((block, groups["R"][0]))
            # the thread that reduced an output also runs its elementwise epilogue chain:
            # one kernel, intermediates in registers, no expression duplication
            chain = [block]
            names = {sch.get(block).name_hint}
            outputs = _spatial_size(sch, block)
            for later in infos[infos.index(info) + 1:]:
                rv = later.block_rv
                if any(sch.get(loop).thread_binding is not None for loop in sch.get_loops(rv)):
                    continue
                # only elementwise followers of this output, all of whose inputs come from the chain
                producers = {sch.get(p).name_hint for p in sch.get_producers(rv)}
                if "R" in later.dom_kind() or not producers or not producers <= names:
                    continue
                if _spatial_size(sch, rv) != outputs:
                    continue
                try:
                    sch.reverse_compute_at(rv, inner, preserve_unit_loops=True)
                except Exception:  # it needs more than this thread's outputs
                    continue
                chain.append(rv)
                names.add(sch.get(rv).name_hint)
            for member in chain:
                consumers = sch.get_consumers(member)
                if consumers and all(sch.get(c).name_hint in names for c in consumers):
                    sch.set_scope(member, 0, "local")
    for block, loop in serial_reductions:
        sch.decompose_reduction(block, loop)


def gpu_pipeline(target: Any) -> Any:
    """The Relax pipeline for CUDA: TVM's own, with :func:`schedule_gpu` as the scheduler."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cuda import pipeline as cuda

    @tvm.transform.module_pass(opt_level=0, name="edgeq.GPUPipeline")
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            legalize = [
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
                schedule_gpu(),
            ]
            seq = tvm.transform.Sequential(
                cuda.library_dispatch_passes(target)
                + legalize
                + cuda.dataflow_lower_passes(target)
                + cuda.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


def build_cuda(mod: Any, target: Any, cuda_graph: bool = True) -> Any:
    """Compile a Relax module for a CUDA ``target``; with ``cuda_graph`` the VM captures the
    model's kernel launches once and replays them as one CUDA graph (fewer launch gaps)."""
    import tvm

    with tvm.transform.PassContext(opt_level=3, config={"relax.backend.use_cuda_graph": bool(cuda_graph)}):
        return tvm.compile(mod, target=target, relax_pipeline=gpu_pipeline(target))


def cuda_sources(executable: Any) -> list[str]:
    """The CUDA C++ source of every CUDA module the executable imports."""
    sources: list[str] = []

    def walk(module: Any) -> None:
        if getattr(module, "kind", None) == "cuda":
            sources.append(module.inspect_source())
        for child in module.imports:
            walk(child)

    walk(executable.mod)
    return sources


def find_nvcc() -> Path:
    """The nvcc to use: $EDGEQ_NVCC, else $CUDA_HOME/bin/nvcc, else nvcc on PATH."""
    candidates = [os.environ.get("EDGEQ_NVCC")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(str(Path(os.environ[var]) / "bin" / "nvcc"))
    candidates += [shutil.which("nvcc"), DEFAULT_NVCC]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise MissingDependencyError(
        "packaging for an NVIDIA GPU compiles its kernels on this machine and needs nvcc from "
        f"the CUDA toolkit ({CUDA_RUNTIME_MAJOR}.x); none was found on PATH, in $CUDA_HOME or "
        "/usr/local/cuda. Install the CUDA toolkit (https://developer.nvidia.com/cuda-downloads, "
        "or Debian's nvidia-cuda-toolkit) or point EDGEQ_NVCC at nvcc. No GPU is needed here."
    )


def nvcc_version(nvcc: Path) -> str:
    output = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=False).stdout
    for line in output.splitlines():
        if "release" in line:
            return "nvcc " + line.rsplit("V", 1)[-1].strip()
    return "nvcc"


def compile_fatbin(source: str, arch: str, nvcc: Path, workdir: Path) -> bytes:
    """Compile one CUDA source into a fatbin: machine code for ``arch`` plus its PTX."""
    number = arch.removeprefix("sm_")
    cu = workdir / "kernels.cu"
    out = workdir / "kernels.fatbin"
    cu.write_text(source, encoding="utf-8")
    command = [
        str(nvcc), "--fatbin", "-O3", "-std=c++17",
        f"-gencode=arch=compute_{number},code=sm_{number}",
        f"-gencode=arch=compute_{number},code=compute_{number}",
        "-o", str(out), str(cu),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise EdgeqError(
            f"nvcc could not compile the model's kernels for {arch}: "
            + (" | ".join(detail[-3:]) if detail else f"exit status {result.returncode}")
        )
    return out.read_bytes()


def compile_kernels(executable: Any, arch: str, progress: Progress = lambda _: None) -> CudaKernels:
    """Compile the executable's CUDA kernels for ``arch`` ("sm_90") with nvcc."""
    nvcc = find_nvcc()
    sources = cuda_sources(executable)
    if not sources:
        raise EdgeqError("the compiled model has no CUDA kernels; nothing would run on the GPU")
    version = nvcc_version(nvcc)
    fatbins: dict[str, bytes] = {}
    kernels = 0
    with tempfile.TemporaryDirectory(prefix="edgeq-cuda-") as workdir:
        for source in sources:
            count = kernel_count(source)
            kernels += count
            progress(f"compiling {count} CUDA kernels for {arch} with {version}")
            fatbins[source_key(source)] = compile_fatbin(source, arch, nvcc, Path(workdir))
    return CudaKernels(fatbins=fatbins, arch=arch, compiler=version, kernel_count=kernels)


def kernel_count(source: str) -> int:
    """Number of kernel definitions in a CUDA source (declarations are not counted)."""
    return sum(1 for line in source.splitlines() if "__global__" in line and line.rstrip().endswith("{"))


def source_key(source: str) -> str:
    """The key the runtime looks kernels up by: sha256 of the UTF-8 source."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()
