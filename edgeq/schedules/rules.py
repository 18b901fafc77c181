"""Default CPU schedules for the PrimFuncs that Relax legalization + fusion produce.

Two strategies, tried in order on a fresh schedule each:

* ``anchored``: one reduction block (conv2d, depthwise conv2d, dense/matmul, pooling, mean)
  with cheap producers inlined and the elementwise epilogue computed inside its tiles.  The
  reduction is register-tiled: the innermost output axis (channels, NHWC) is split into a few
  vector registers, the next axis (width) into a small unrolled tile, reductions sit between
  the outer (parallel) and the register loops, the accumulator lives in a small stack buffer.
  Kernels that :mod:`.dotprod` packed for the ISA's integer dot product (VNNI, AVX2
  ``vpmaddwd``, ARM ``sdot``) get their innermost channel vectors tensorized with it. An
  average pool fused after the reduction (windows that tile its output) is computed in the
  same tiles, which then cover whole windows; a float input's QUANTIZE fused in front is
  computed per core, for the input rows that core's tiles read.
* ``blockwise``: every block alone: elementwise blocks get their innermost axis vectorized
  and their outer loops fused and run in parallel; other reductions (softmax, ...) get their
  spatial loops in parallel.

Integer outputs are bit-identical to the unscheduled build: the steps only reorder int32
additions, which are exact.
"""
from __future__ import annotations

import contextvars
import dataclasses
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.schedule import LoopRV, SBlockRV
from tvm.s_tir.schedule.analysis import is_output_block

from .dotprod import DEPTHWISE_ROWS, DotProduct, dot_for, tensorize_dot
from .fusion import has_costly_call, is_pad_value, tiled_window_block, walk
from .target import CpuInfo

log = logging.getLogger(__name__)

# Elementwise work below this many elements runs on one thread (pool wake-up costs ~µs).
_MIN_PARALLEL_ELEMS = 4096
# A reduction kernel runs on one thread below this many multiply-adds (or window elements): waking
# the other threads and waiting for them costs more than they save.
_MIN_PARALLEL_WORK = 32768
# Inlining stops when a consumer's expression would grow past this many nodes: values read
# several times (integer requantization) would otherwise grow exponentially along a chain.
_MAX_INLINED_NODES = 64
_MAX_DUPLICATED_NODES = 64
# A value read once only adds its nodes: such chains (a requantization, then the uint8 shift of
# the next layer's input, then its cast) may grow this far.
_MAX_SINGLE_READ_NODES = 256
# A block this small that reads only the function's inputs always inlines: an int8 residual ADD's
# rescale of its skip input ((x - zp) << 20), left as blocks of their own, kept the convolution's
# epilogue out of its tiles (three more passes over int32 tensors, in EfficientNet-Lite0 too).
_MAX_LEAF_NODES = 24
# Functions whose largest loop nest is smaller than this keep the default (unscheduled) code.
_MIN_SCHEDULED_ELEMS = 512
# Innermost loops up to this extent are unrolled when they cannot be vectorized.
_MAX_UNROLLED_INNER = 8
# Narrowest vector (in elements) used when a channel count is not a multiple of the full width.
_MIN_VECTOR_LANES = 4


@dataclass(frozen=True)
class ScheduleKnobs:
    """The register-tile choices of the default schedules; ``edgeq tune`` tries a few others per
    kernel (:data:`KNOB_CANDIDATES`) and keeps the fastest."""

    # Vector tiles are 4, 2 or 1 registers: odd multiples (24 floats) made LLVM emit slow shuffles.
    vec_choices: tuple[int, ...] = (4, 2, 1)
    # Tensorized kernels issue one instruction per vector: three vectors are as good as two or four
    # (rps96's 24-channel first conv); some epilogues run slower across them (EfficientNet-Lite0's
    # 24-channel projection with its residual add: 145 -> 108 us with (4, 2, 1) on one thread).
    dot_vec_choices: tuple[int, ...] = (4, 3, 2, 1)
    # Largest register tile along the width axis.
    max_width_tile: int = 12
    # Largest accumulator tile. TVM's own stack limit (1 KiB) set it; with larger buffers kept on the
    # stack (.stack_buffers) 16 KiB tiles measured slower for whole models (EfficientNet-Lite0 2076
    # -> 2144 us, VWW 89 -> 107 us on two threads), so the default stays.
    max_stack_bytes: int = 1024

    def to_dict(self) -> dict[str, object]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> "ScheduleKnobs":
        """The knobs a tuning database recorded (unknown names are an error: a newer edgeq wrote them)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown schedule knobs {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


DEFAULT_KNOBS = ScheduleKnobs()
# What `edgeq tune` measures per kernel besides the default (only those that change its schedule).
KNOB_CANDIDATES = (
    ScheduleKnobs(dot_vec_choices=(4, 2, 1)),
    ScheduleKnobs(dot_vec_choices=(2, 1)),
    ScheduleKnobs(dot_vec_choices=(1,)),
    ScheduleKnobs(vec_choices=(2, 1)),
    ScheduleKnobs(max_width_tile=6),
    ScheduleKnobs(max_width_tile=16),
    ScheduleKnobs(dot_vec_choices=(4, 2, 1), max_width_tile=16),
    ScheduleKnobs(dot_vec_choices=(1,), max_width_tile=16),
    ScheduleKnobs(dot_vec_choices=(4, 2, 1), max_width_tile=6),
    ScheduleKnobs(dot_vec_choices=(4, 2, 1), max_stack_bytes=2048),
)
_knobs: contextvars.ContextVar[ScheduleKnobs] = contextvars.ContextVar("edgeq_schedule_knobs", default=DEFAULT_KNOBS)


@contextmanager
def _using(knobs: ScheduleKnobs) -> Iterator[None]:
    token = _knobs.set(knobs)
    try:
        yield
    finally:
        _knobs.reset(token)


def is_scalar_sized(func: tirx.PrimFunc) -> bool:
    """Whether ``func``'s largest loop nest is too small for threads and vectors to pay off
    (edgeq leaves such kernels unscheduled, and ``edgeq tune`` leaves them out)."""
    return _max_elements(s_tir.Schedule(func)) < _MIN_SCHEDULED_ELEMS


def schedule_func(func: tirx.PrimFunc, info: CpuInfo, knobs: ScheduleKnobs = DEFAULT_KNOBS) -> tirx.PrimFunc | None:
    """Return ``func`` scheduled for ``info``'s CPU, or None when no strategy applies."""
    with _using(knobs):
        return _schedule_func(func, info)


def _schedule_func(func: tirx.PrimFunc, info: CpuInfo) -> tirx.PrimFunc | None:
    if is_scalar_sized(func):
        return None
    func, fills = split_pad_fills(func, info)
    fuse_limit = 1 << 30
    strategies: list[Callable[[s_tir.Schedule, CpuInfo], bool]] = [
        lambda sch, info: _anchored(sch, info, fuse_limit),
        lambda sch, info: _anchored(sch, info, fuse_limit),  # retried once with a fuse limit
        _blockwise,
    ]
    for strategy in strategies:
        sch = s_tir.Schedule(func)
        try:
            if strategy(sch, info):
                return prepend_fills(sch.mod["main"], fills)
        except _FuseLimit as limit:
            fuse_limit = limit.limit
        except (RuntimeError, ValueError) as err:  # ScheduleError and TVM errors are RuntimeErrors
            log.debug("strategy failed: %s", str(err))
    return None


# ---------------------------------------------------------------- analysis helpers


def _root(sch: s_tir.Schedule) -> SBlockRV:
    return sch.get_sblock("root")


def _is_reduction(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def _inline_grows_ok(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """Whether inlining ``block`` keeps every consumer expression small.

    A value read several times (integer requantization reads it in comparisons and selects)
    would otherwise grow exponentially along a chain, and so would compile time.
    """
    stmt = sch.get(block)
    if len(stmt.writes) != 1:
        return False
    buffer = stmt.writes[0].source
    size = len(walk(stmt.body))
    if size <= _MAX_LEAF_NODES and not sch.get_producers(block):
        return True  # a few nodes over the function's inputs (a residual's rescale): no chain to grow
    for consumer in sch.get_consumers(block):
        nodes = walk(sch.get(consumer).body)
        reads = sum(1 for n in nodes if isinstance(n, tvm.ir.expr.TensorLoad) and n.source.same_as(buffer))
        limit = _MAX_SINGLE_READ_NODES if reads <= 1 else _MAX_INLINED_NODES
        if len(nodes) + reads * size > limit or (reads > 1 and size > _MAX_DUPLICATED_NODES):
            return False
    return True


def _iterations(sch: s_tir.Schedule, block: SBlockRV) -> int | None:
    """Iteration count of ``block``'s loop nest (None if some extent is symbolic)."""
    count = 1
    for loop in sch.get_loops(block):
        extent = _int_extent(sch, loop)
        if extent is None:
            return None
        count *= extent
    return count


def _max_elements(sch: s_tir.Schedule) -> int:
    """Largest iteration count of any block's loop nest (0 if some extent is symbolic)."""
    counts = [_iterations(sch, block) for block in sch.get_child_blocks(_root(sch))]
    return 0 if None in counts else max(counts, default=0)


def _int_extent(sch: s_tir.Schedule, loop: LoopRV) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _widest_dtype(sch: s_tir.Schedule, block: SBlockRV) -> str:
    stmt = sch.get(block)
    dtypes = [r.source.dtype for r in list(stmt.reads) + list(stmt.writes)]
    return max(dtypes, key=lambda d: tvm.DataType(d).bits)


def _vector_tile(extent: int, lanes: int) -> int:
    """Largest ``lanes * k`` (k in 4, 2, 1) dividing ``extent``, else the widest narrower vector
    (a power of two, at least ``_MIN_VECTOR_LANES``) dividing it; 0 if none."""
    for k in _knobs.get().vec_choices:
        if extent % (lanes * k) == 0:
            return lanes * k
    narrow = _narrow_lanes(extent, lanes)
    return narrow if extent % narrow == 0 else 0


def _narrow_lanes(extent: int, lanes: int) -> int:
    """``lanes`` halved until it divides ``extent`` or reaches ``_MIN_VECTOR_LANES``.

    24 or 40 channels on a 16-lane (AVX-512 int32) target then run on 8-lane vectors instead of
    falling back to scalar code.
    """
    while lanes > _MIN_VECTOR_LANES and extent % lanes:
        lanes //= 2
    return lanes


# ---------------------------------------------------------------- padding


def split_pad_fills(func: tirx.PrimFunc, info: CpuInfo) -> tuple[tirx.PrimFunc, list[tirx.Stmt]]:
    """Split each pad of a computed tensor into "copy the interior" + "fill the border value".

    A kernel that pads its result for the next conv (FuseOps fused the pad in, see
    :mod:`.fusion`) writes a bordered tensor larger than its anchor's output. Returned apart:
    ``func`` with interior copies only - they have the anchor's domain and join its tiles - and
    the fills, loops over the border only (:func:`_border_fill`; a vectorized fill of the whole
    tensor where the pad's offsets are not constants), for :func:`prepend_fills` to put first
    once ``func`` is scheduled. Without this the whole int32 accumulator was materialized
    before a separate padding pass.
    """
    sch = s_tir.Schedule(func)
    fills = []
    for block in sch.get_child_blocks(_root(sch)):
        stmt = sch.get(block)
        if not (isinstance(stmt.body, tirx.BufferStore) and is_pad_value(stmt.body.value)):
            continue
        if not sch.get_producers(block) or not is_output_block(sch, block):
            continue  # padding a kernel input: the consumer reads it as it is
        border = _border_fill(stmt)
        try:
            fill = sch.decompose_padding(block, sch.get_loops(block)[0])
        except s_tir.ScheduleError:
            continue
        if border is None:
            _schedule_elementwise(sch, fill, info)
        fills.append((fill, border))
    if not fills:
        return func, []
    fill_nests = [sch.get(sch.get_loops(fill)[0]) for fill, _ in fills]
    scheduled = sch.mod["main"]
    rest = [n for n in _root_statements(scheduled) if not any(n.same_as(f) for f in fill_nests)]
    return _with_root_statements(scheduled, rest), [
        nest if border is None else border for nest, (_, border) in zip(fill_nests, fills)
    ]


def _border_fill(pad: s_tir.SBlock) -> tirx.Stmt | None:
    """Loops that write a pad block's constant into its border only: per padded axis, the slabs
    before and after the interior (the interior is written by the copy, inside the anchor's tiles).
    A full-size fill wrote every byte of the padded tensor twice (EfficientNet-Lite0's expanded
    112 x 112 x 96 activations: 1.2 MB more memory traffic in one kernel). None if the pad's
    offsets are not constants."""
    store = pad.body
    _, inside, value = store.value.args
    out_shape = [int(d) for d in store.buffer.shape]
    in_shape = [int(d) for d in inside.source.shape]
    analyzer = tvm.sym.Analyzer()
    # the interior starts where the input's index (v - before) is 0
    offsets = [analyzer.simplify(i - o) for i, o in zip(inside.indices, store.indices)]
    if len(offsets) != len(out_shape) or not all(isinstance(o, tirx.IntImm) for o in offsets):
        return None
    before = [-int(o) for o in offsets]
    slabs = []
    for axis, (size, low, inner) in enumerate(zip(out_shape, before, in_shape)):
        for start, extent in ((0, low), (low + inner, size - low - inner)):
            if extent <= 0:
                continue
            ranges = [(0, d) for d in out_shape]
            ranges[:axis] = [(b, n) for b, n in zip(before[:axis], in_shape[:axis])]  # slabs do not overlap
            ranges[axis] = (start, extent)
            slabs.append(ranges)
    statements = []
    for ranges in slabs:
        loop_vars = [tirx.Var(f"border{d}", "int64") for d in range(len(ranges))]
        body = tirx.BufferStore(store.buffer, value, [tirx.const(b, "int64") + v for (b, _), v in zip(ranges, loop_vars)])
        for (_, extent), var in reversed(list(zip(ranges, loop_vars))):
            body = tirx.For(var, tirx.const(0, "int64"), tirx.const(extent, "int64"), tirx.ForKind.SERIAL, body)
        statements.append(body)
    return tirx.SeqStmt(statements) if len(statements) > 1 else statements[0]


def prepend_fills(func: tirx.PrimFunc, fills: list[tirx.Stmt]) -> tirx.PrimFunc:
    """``func`` with the border fills of :func:`split_pad_fills` run first (nothing before them
    touches the padded outputs they write)."""
    return _with_root_statements(func, fills + _root_statements(func)) if fills else func


def _root_statements(func: tirx.PrimFunc) -> list[tirx.Stmt]:
    body = func.body.block.body
    return list(body.seq) if isinstance(body, tirx.SeqStmt) else [body]


def _with_root_statements(func: tirx.PrimFunc, statements: list[tirx.Stmt]) -> tirx.PrimFunc:
    realize = func.body
    root = realize.block
    body = tirx.SeqStmt(statements) if len(statements) > 1 else statements[0]
    new_root = s_tir.SBlock(root.iter_vars, root.reads, root.writes, root.name_hint, body, root.init,
                            root.alloc_buffers, root.match_buffers, root.annotations)
    return func.with_body(s_tir.SBlockRealize(realize.iter_values, realize.predicate, new_root))


# ---------------------------------------------------------------- inlining


def inline_injective(sch: s_tir.Schedule) -> None:
    """Inline spatial blocks into consumers; padding too (measured faster than a padded copy).
    A block feeding a second reduction (a pool fused after a convolution) stays: it is the
    convolution's epilogue, computed in its tiles."""
    changed = True
    while changed:
        changed = False
        blocks = list(sch.get_child_blocks(_root(sch)))
        # by name: the blocks' objects change as others are inlined
        later_reductions = [sch.get(b).name_hint for b in blocks if _is_reduction(sch, b)][1:]
        for block in blocks:
            if _is_reduction(sch, block) or is_output_block(sch, block):
                continue
            if any(sch.get(c).name_hint in later_reductions for c in sch.get_consumers(block)):
                continue
            if sch.get(block).name_hint == DEPTHWISE_ROWS:
                continue  # packed once per tile for the dot products (see _anchored)
            feeds_reduction = any(_is_reduction(sch, c) for c in sch.get_consumers(block))
            if feeds_reduction and has_costly_call(sch.get(block).body):
                continue  # recomputed per multiply-add; padding (if_then_else) is cheaper inlined
            if not _inline_grows_ok(sch, block):
                continue
            try:
                sch.compute_inline(block)
            except s_tir.ScheduleError:
                continue
            changed = True


# ---------------------------------------------------------------- elementwise


def _schedule_elementwise(sch: s_tir.Schedule, block: SBlockRV, info: CpuInfo) -> None:
    """Vectorize the innermost loop in register-sized chunks, run the outer loops in parallel.

    Only the innermost axis is vectorized - fusing it with outer axes would turn contiguous
    accesses into div/mod index arithmetic that LLVM turns into gathers - unless it is narrower
    than a vector (an RGB image's 3 channels) and every access covers it whole: then rows fuse
    into one contiguous run (see :func:`_rows_contiguous`).
    """
    loops = sch.get_loops(block)
    extents = [_int_extent(sch, loop) for loop in loops]
    if not loops or any(e is None for e in extents):
        return
    lanes = info.lanes(_widest_dtype(sch, block))
    if len(loops) >= 2 and extents[-1] < _MIN_VECTOR_LANES and _rows_contiguous(sch, block):
        loops = [*loops[:-2], sch.fuse(loops[-2], loops[-1])]
        extents = [*extents[:-2], extents[-2] * extents[-1]]
    inner = _vector_tile(extents[-1], lanes)
    outer = list(loops)
    if inner:
        if extents[-1] > inner:
            outer[-1], vec = sch.split(loops[-1], [None, inner])
        else:
            vec = outer.pop()
        sch.vectorize(vec)
    elif len(outer) > 1 and extents[-1] <= _MAX_UNROLLED_INNER:
        # A short axis that cannot be vectorized: unrolled, so that fusing the outer loops does
        # not put a division and a modulo into every element's index.
        sch.unroll(outer.pop())
    if not outer:
        return
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    total = 1
    for e in extents:
        total *= e
    if total >= _MIN_PARALLEL_ELEMS and info.num_cores > 1 and (_int_extent(sch, fused) or 0) > 1:
        sch.parallel(fused)


def _rows_contiguous(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """Whether every buffer ``block`` reads or writes is indexed ``[..., row + k, col]`` by its last
    two iteration variables with ``col`` spanning the buffer's whole last axis (or is a scalar):
    fusing row and col then walks each buffer contiguously (a pad's interior copy qualifies;
    per-channel constants, indexed by col alone, do not)."""
    stmt = sch.get(block)
    if len(stmt.iter_vars) < 2:
        return False
    row, col = stmt.iter_vars[-2], stmt.iter_vars[-1]
    analyzer = tvm.sym.Analyzer()
    for region in list(stmt.reads) + list(stmt.writes):
        buffer, ranges = region.source, region.region
        if not ranges:
            continue  # a scalar, broadcast to every element
        if len(ranges) < 2 or not ranges[-1].min.same_as(col.var):
            return False
        if int(buffer.shape[-1]) != int(col.dom.extent):
            return False
        if not isinstance(analyzer.simplify(ranges[-2].min - row.var), tirx.IntImm):
            return False
    return True


def _schedule_reduction_generic(sch: s_tir.Schedule, block: SBlockRV, info: CpuInfo) -> None:
    """Parallelize the spatial loops that enclose a reduction (leading 'S' loops), unless it is
    smaller than :data:`_MIN_PARALLEL_WORK` in all."""
    loops = sch.get_loops(block)
    spatial = []
    for loop, iv in zip(loops, sch.get(block).iter_vars):
        if iv.iter_type != tirx.IterVar.DataPar:
            break
        spatial.append(loop)
    if not spatial:
        return
    work = _iterations(sch, block)  # None (symbolic): assume it is large
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    extent = _int_extent(sch, fused)
    if extent is not None and extent >= 2 and info.num_cores > 1 and (work is None or work >= _MIN_PARALLEL_WORK):
        sch.parallel(fused)


def _blockwise(sch: s_tir.Schedule, info: CpuInfo) -> bool:
    inline_injective(sch)
    for block in sch.get_child_blocks(_root(sch)):
        if _is_reduction(sch, block):
            _schedule_reduction_generic(sch, block, info)
        else:
            _schedule_elementwise(sch, block, info)
    return True


# ---------------------------------------------------------------- anchored reduction


def _register_tile(
    width: int, vec_extent: int, lanes: int, regs: int, acc_bytes: int,
    vec_choices: tuple[int, ...] = DEFAULT_KNOBS.vec_choices, broadcast_cost: int = 1, multiple_of: int = 1,
) -> tuple[int, int]:
    """Pick (width tile, vector tile): ``width`` positions x ``vecs`` vectors of accumulators.

    Per multiply-accumulate instruction, a tile spends ``broadcast_cost / vecs`` on broadcasting
    activations (one broadcast per width position, shared by its vectors) and ``1 / width`` on
    loading weights (one load per vector, shared by the width positions); the cheapest tile whose
    accumulators and weight vectors fit ``regs`` registers and that stays below the
    stack-allocation limit (a larger accumulator is heap-allocated per tile) wins, the larger one
    on ties. With a pool fused after it the width tile is a multiple of the pool's window.
    """
    best: tuple[float, int, int, int] | None = None  # (-cost, accumulators, vectors, width tile)
    for vecs in vec_choices:
        if vec_extent % (lanes * vecs):
            continue
        for tile in range(min(width, _knobs.get().max_width_tile), 0, -1):
            if width % tile or tile % multiple_of or tile * vecs + vecs > regs or tile * vecs * lanes * acc_bytes >= _knobs.get().max_stack_bytes:
                continue
            candidate = (-(broadcast_cost / vecs + 1 / tile), tile * vecs, vecs, tile)
            if best is None or candidate > best:
                best = candidate
    if best is None:
        return 1, lanes
    return best[3], best[2] * lanes


class _FuseLimit(Exception):
    """Raised by the anchored strategy: only the first ``limit`` consumers can join the tiles."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


def _anchored(sch: s_tir.Schedule, info: CpuInfo, fuse_limit: int = 1 << 30) -> bool:
    inline_injective(sch)
    blocks = sch.get_child_blocks(_root(sch))
    reductions = [b for b in blocks if _is_reduction(sch, b)]
    if not 1 <= len(reductions) <= 2:
        return False
    anchor = reductions[0]
    position = [sch.get(b).name_hint for b in blocks].index(sch.get(anchor).name_hint)
    before, after = blocks[:position], blocks[position + 1 :]

    stmt = sch.get(anchor)
    loops = sch.get_loops(anchor)
    kinds = "".join("S" if iv.iter_type == tirx.IterVar.DataPar else "R" for iv in stmt.iter_vars)
    n_spatial = kinds.count("S")
    if len(loops) != len(kinds) or kinds != "S" * n_spatial + "R" * (len(kinds) - n_spatial):
        return False
    if n_spatial == 0 or len(stmt.writes) != 1:
        return False
    # The innermost spatial axis must be the contiguous (last) axis of the output.
    last_index = stmt.writes[0].region[-1].min
    if not last_index.same_as(stmt.iter_vars[n_spatial - 1].var):
        return False
    extents = [_int_extent(sch, loop) for loop in loops]
    if any(e is None for e in extents):
        return False
    pool = _tiling_pool(sch, reductions[1], extents[:n_spatial]) if len(reductions) == 2 else None
    if len(reductions) == 2 and pool is None:
        return False
    acc_dtype = stmt.writes[0].source.dtype
    vec_extent = extents[n_spatial - 1]
    lanes = _narrow_lanes(vec_extent, info.lanes(acc_dtype))
    if vec_extent % lanes:
        return False

    packed_rows = [b for b in before if sch.get(b).name_hint == DEPTHWISE_ROWS]
    # A float input's QUANTIZE fused in front (fusion.FuseInputPrologue): computed per thread
    # in the tiles' parallel loop if it can be, below.
    prologue = [b for b in before if b not in packed_rows and has_costly_call(sch.get(b).body)]
    for block in before:
        if block not in packed_rows and block not in prologue:
            _schedule_elementwise(sch, block, info)

    width = extents[n_spatial - 2] if n_spatial >= 2 else 1
    regs = info.vector_regs - 4
    narrow_dot = dot_for(sch, anchor, info.dots, lanes)
    knobs = _knobs.get()
    choices = knobs.dot_vec_choices if narrow_dot is not None else knobs.vec_choices
    broadcast_cost = narrow_dot.broadcast_cost if narrow_dot is not None else 1
    acc_bytes = tvm.DataType(acc_dtype).bits // 8
    width_tile, vec_tile = _register_tile(
        width, vec_extent, lanes, regs, acc_bytes, choices, broadcast_cost, multiple_of=pool[1] if pool else 1
    )
    if pool is not None and width_tile % pool[1]:
        return False

    # "global", not "local": on CPU only small global-scope allocations become stack
    # allocas (LowerTVMBuiltin); "local" ones become a workspace alloc per loop iteration.
    cache = sch.cache_write(anchor, 0, "global")
    spatial, reduce = loops[:n_spatial], loops[n_spatial:]
    v_outer, v_inner = sch.split(spatial[-1], [None, vec_tile])
    if pool is not None:
        # A tile covers whole windows of the pool: its rows are register tiles one after another,
        # each written and requantized at ``tile_loop``, then pooled at ``outer[-1]``.
        y_outer, tile_loop = sch.split(spatial[-3], [None, pool[0]])
        w_outer, w_inner = sch.split(spatial[-2], [None, width_tile])
        outer = [*spatial[:-3], y_outer, w_outer, v_outer]
        sch.reorder(*outer, tile_loop, *reduce, w_inner, v_inner)
        sch.unroll(tile_loop)
        sch.unroll(w_inner)
    elif n_spatial >= 2:
        w_outer, w_inner = sch.split(spatial[-2], [None, width_tile])
        outer = [*spatial[:-2], w_outer, v_outer]
        sch.reorder(*outer, *reduce, w_inner, v_inner)
        sch.unroll(w_inner)
    else:
        outer = [v_outer]
        sch.reorder(v_outer, *reduce, v_inner)
    if pool is None:
        tile_loop = outer[-1]
    dot = dot_for(sch, anchor, info.dots, vec_tile)
    if dot is None:
        sch.vectorize(v_inner)

    for block in packed_rows:  # a depthwise kernel's packed window rows: per tile, in its loops
        sch.compute_at(block, tile_loop, preserve_unit_loops=True)
        sch.unroll(sch.get_loops(block)[-2])  # the row groups: their zero rows fold away
        _vectorize_innermost(sch, block)
    sch.reverse_compute_at(cache, tile_loop, preserve_unit_loops=True)
    _vectorize_innermost(sch, cache)
    tile_size = width_tile * vec_tile if n_spatial >= 2 else vec_tile
    if pool is not None:
        pooled = [b for b in after if after.index(b) >= after.index(reductions[1])]
        after = after[: after.index(reductions[1])]
    for index, block in enumerate(after):
        # Only consumers over exactly the anchor's output domain go into its tiles: one over a
        # larger domain (the next layer's padding fused in) would lose the rest of its domain.
        same_domain = [_int_extent(sch, loop) for loop in sch.get_loops(block)] == extents[:n_spatial]
        if pool is not None and (index >= fuse_limit or not same_domain):
            return False  # the pool reads it tile by tile
        if index >= fuse_limit or not same_domain:
            _schedule_elementwise(sch, block, info)
            continue
        try:
            sch.reverse_compute_at(block, tile_loop, preserve_unit_loops=True)
        except s_tir.ScheduleError:
            if pool is not None:
                return False
            _schedule_elementwise(sch, block, info)
            continue
        inner = sch.get_loops(block)[len(outer) + (pool is not None) :]
        work = 1
        for loop in inner:
            work *= _int_extent(sch, loop) or 0
        if work != tile_size:
            # It needs more than the tile (a non-elementwise read): computing it per tile would
            # recompute it and race between threads. Start over, fusing only the blocks before.
            raise _FuseLimit(index)
        if not _vectorize_across_pixels(sch, block, info, vec_tile, vec_extent, width_tile):
            _vectorize_innermost(sch, block)
    pool_sums = _pool_in_tiles(sch, pooled, outer[-1], tile_size // pool[1]) if pool else None
    if not is_output_block(sch, cache):
        try:
            sch.compute_inline(cache)
        except s_tir.ScheduleError:
            pass
    work = 1
    for extent in extents:
        work *= extent
    tiles = 1
    for loop in outer:
        tiles *= _int_extent(sch, loop) or 0
    parallel = info.num_cores > 1 and tiles >= 2 and work >= _MIN_PARALLEL_WORK
    # before decompose_reduction: parallel needs the init in the block
    if not (parallel and prologue and _prologue_per_thread(sch, prologue, outer, info)):
        for block in prologue:
            _schedule_elementwise(sch, block, info)
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        if parallel:
            sch.parallel(fused)
    if reduce:
        init = sch.decompose_reduction(anchor, reduce[0])
        _vectorize_innermost(sch, init)
    if pool_sums is not None:
        _vectorize_innermost(sch, sch.decompose_reduction(*pool_sums))
    if dot is not None:
        _tensorize_or_vectorize(sch, anchor, dot, v_inner)
    return True


def _prologue_per_thread(sch: s_tir.Schedule, blocks: list[SBlockRV], outer: list[LoopRV], info: CpuInfo) -> bool:
    """Run the tiles' outermost loop as one parallel loop over the cores, each iteration a core's
    share of rows, and compute ``blocks`` (a fused input prologue) inside it for the input rows
    those tiles read: no kernel and no wake-up of the threads of its own, a few halo rows
    computed twice. Each core writes its own copy (the buffer is allocated in the parallel loop).
    False, ``sch`` untouched, where the rows do not split evenly or a block does not move."""
    extents = [_int_extent(sch, loop) or 0 for loop in outer]
    first = next((i for i, e in enumerate(extents) if e > 1), None)
    if first is None or extents[first] % info.num_cores or extents[first] < 2 * info.num_cores:
        return False

    def apply(target: s_tir.Schedule) -> None:
        cores, rest = target.split(outer[first], [info.num_cores, None])
        per_core = [*outer[:first], cores]
        cores = target.fuse(*per_core) if len(per_core) > 1 else cores
        inner = [rest, *outer[first + 1 :]]
        if len(inner) > 1:
            target.fuse(*inner)
        target.parallel(cores)
        for block in reversed(blocks):
            target.compute_at(block, cores, preserve_unit_loops=True)
        for block in blocks:
            _vectorize_rows(target, block, info)

    try:
        apply(sch.copy())  # random variables stay valid in a copy: a failed try leaves ``sch`` intact
    except (RuntimeError, ValueError, s_tir.ScheduleError) as error:
        log.debug("prologue stays a loop of its own: %s", error)
        return False
    apply(sch)
    return True


def _vectorize_rows(sch: s_tir.Schedule, block: SBlockRV, info: CpuInfo) -> None:
    """Vectorize a block's innermost loop at the ISA's width; a row that is not a multiple of it
    (a padded input row: 96 pixels and 2 of padding) runs its whole vectors, then the rest unrolled."""
    loop = sch.get_loops(block)[-1]
    extent = _int_extent(sch, loop) or 0
    lanes = info.lanes(_widest_dtype(sch, block))
    whole = extent - extent % lanes
    if whole and whole != extent:
        loop, rest = sch.loop_partition(loop, [whole, None])
        sch.unroll(rest)
    if whole:
        _unrolled_vectors(sch, loop, lanes)


def _tiling_pool(sch: s_tir.Schedule, block: SBlockRV, anchor_extents: list[int]) -> tuple[int, int] | None:
    """(window rows, window columns) of a pool fused after the anchor whose windows tile the
    anchor's NHWC output (each output element summed once), else None."""
    window = tiled_window_block(sch.get(block))
    if window is None or len(anchor_extents) != 4:
        return None
    shape = [int(d) for d in sch.get(block).reads[0].source.shape]
    if shape != list(anchor_extents) or anchor_extents[1] % window[0] or anchor_extents[2] % window[1]:
        return None
    return window


def _pool_in_tiles(
    sch: s_tir.Schedule, blocks: list[SBlockRV], tile_loop: LoopRV, pooled_size: int
) -> tuple[SBlockRV, LoopRV]:
    """Compute a fused pool (its window sums, then its epilogue) inside the anchor's tiles: each
    tile pools the rows and pixels it has just requantized, channels vectorized. Returns the
    window-sum block and its first window loop: the reduction is decomposed there once the tile
    loop is parallel.

    Raises ``ScheduleError`` when a block does not fit the tile."""
    window_sum, *epilogue = blocks
    sch.reverse_compute_at(window_sum, tile_loop, preserve_unit_loops=True)
    loops = sch.get_loops(window_sum)
    *spatial, ry, rx = loops[-6:]
    sch.reorder(ry, rx, *spatial[-2:])
    sch.unroll(spatial[-2])
    _vectorize_innermost(sch, window_sum)
    for block in epilogue:
        sch.reverse_compute_at(block, tile_loop, preserve_unit_loops=True)
        work = 1
        for loop in sch.get_loops(block)[-4:]:
            work *= _int_extent(sch, loop) or 0
        if work != pooled_size:
            raise s_tir.ScheduleError("a pool epilogue needs more than its tile")
        _vectorize_innermost(sch, block)
    return window_sum, ry


def _vectorize_across_pixels(
    sch: s_tir.Schedule, block: SBlockRV, info: CpuInfo, vec_tile: int, channels: int, width_tile: int
) -> bool:
    """Vectorize an epilogue block at the ISA's full width across pixels when its channels
    (all of them in the tile) are narrower than that: 24 int32 channels run as 8-lane vectors,
    but the tile's 8 pixels x 24 channels are 192 contiguous elements, 12 full 16-lane vectors."""
    if vec_tile != channels or width_tile < 2:
        return False
    loops = sch.get_loops(block)
    lanes = info.lanes(_widest_dtype(sch, block))
    if channels % lanes == 0 or (width_tile * channels) % lanes:
        return False
    _unrolled_vectors(sch, sch.fuse(loops[-2], loops[-1]), lanes)
    return True


def _unrolled_vectors(sch: s_tir.Schedule, loop: LoopRV, lanes: int) -> None:
    """``loop`` as unrolled vectors of ``lanes`` elements."""
    vectors, inner = sch.split(loop, [None, lanes])
    sch.unroll(vectors)
    sch.vectorize(inner)


def _tensorize_or_vectorize(sch: s_tir.Schedule, update: SBlockRV, dot: DotProduct, vec_loop: LoopRV) -> None:
    """Tensorize ``update`` with ``dot``; vectorize ``vec_loop`` instead if the intrinsic does not match."""
    trial = sch.copy()  # random variables stay valid in a copy: a failed try leaves ``sch`` intact
    try:
        tensorize_dot(trial, update, dot)
    except (RuntimeError, ValueError, s_tir.ScheduleError) as error:
        log.debug("%s not applied: %s", dot.intrin, error)
        sch.vectorize(vec_loop)
        return
    tensorize_dot(sch, update, dot)


def _vectorize_innermost(sch: s_tir.Schedule, block: SBlockRV) -> None:
    """Vectorize the innermost loop of ``block`` if its extent is a power of two (2..64); an extent
    that is not (a tile of 3 vectors: 24 or 48 channels) runs as unrolled vectors of the largest
    power of two dividing it."""
    loops = sch.get_loops(block)
    extent = _int_extent(sch, loops[-1]) if loops else None
    if extent is None or extent < 2:
        return
    width = extent & -extent  # largest power of two dividing the extent
    if width == extent and extent <= 64:
        sch.vectorize(loops[-1])
    elif 4 <= width <= 64 and extent <= 4 * 64:
        _unrolled_vectors(sch, loops[-1], width)
