"""Integer dot-product instructions for int8 conv2d / matmul: VNNI, AVX2 ``vpmaddwd``, ARM ``sdot``.

Each instruction adds, to every int32 lane of an accumulator, the sum of ``depth`` products of
one broadcast group of ``depth`` activations with ``depth`` weights of that lane's channel::

    for i in 0..lanes:              # output channels
      for k in 0..depth:            # consecutive input channels (the reduction)
        C[i] += int32(A[k]) * int32(B[i, k])

They are used in three places:

* :class:`PackForDotProduct` (Relax, before legalization) rewrites every NHWC conv2d (HWIO,
  ungrouped) and matmul with a constant 8-bit weight into a TE kernel reading the weight packed
  once, at compile time, as ``W'[..., c // depth, f, c % depth]`` in the instruction's weight
  type. For ``vpdpbusd`` (unsigned x signed) the int8 activations are shifted to uint8,
  ``x + 128``, and ``-128 * sum(w)`` is added back per channel: exact in int32. An image with
  1-3 channels (a grayscale or RGB input) takes its groups along its flattened rows instead:
  the taps x channels of a window row are contiguous bytes (:func:`_dot_conv2d_width_grouped`).
* On VNNI a depthwise conv2d (one filter per channel) becomes :func:`_dot_depthwise`: each tile
  packs a window column's rows into the 4 bytes of an int32 per channel, and ``vpdpbusd`` takes
  both operands per lane (no broadcast): 4 multiply-adds per instruction.
* :func:`tensorize_dot` (TIR, from the anchored schedule) replaces the innermost
  ``lanes x depth`` loops of such a kernel with the instruction.

Integer addition is exact, so the results are bit-identical to the plain kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx
from tvm.ir.expr import TensorLoad
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

R = relax.op


@dataclass(frozen=True)
class DotProduct:
    """One dot-product instruction as a tensor intrinsic."""

    intrin: str  # registered TensorIntrin name
    lanes: int  # int32 accumulators per instruction
    depth: int  # products summed into each lane
    data_dtype: str  # activation operand ("uint8" for vpdpbusd, else "int8")
    weight_dtype: str  # weight operand as packed
    broadcast_cost: int = 1  # instructions that broadcast one activation group to all lanes


# ---------------------------------------------------------------- edgeq's own intrinsics


def _desc(lanes: int, depth: int, data_dtype: str, weight_dtype: str):
    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((depth,), data_dtype, offset_factor=1),
        B: T.Buffer((lanes, depth), weight_dtype, offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:depth], B[0:lanes, 0:depth])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, depth):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


def _vnni_impl(lanes: int):
    """``vpdpbusd`` on ``lanes`` int32 lanes (LLVM 17+ takes the bytes as ``<N x i8>`` vectors,
    which TVM's own ``dot_16x4_vnni`` does not match)."""
    width = {16: 512, 8: 256}[lanes]
    bytes_ = f"int8x{4 * lanes}"

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(f"llvm.x86.avx512.vpdpbusd.{width}"),
                C.vload([0], dtype=f"int32x{lanes}"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), lanes), dtype=bytes_),
                B.vload([0, 0], dtype=bytes_),
                dtype=f"int32x{lanes}",
            )

    return impl


@T.prim_func(s_tir=True)
def _pmaddwd_8x2_impl(
    A: T.Buffer((2,), "int8", offset_factor=1),
    B: T.Buffer((8, 2), "int16", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:2], B[0:8, 0:2])
        T.writes(C[0:8])
        C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
            # the two int8 activations broadcast as one 16-bit word, then widened: [a0, a1] * 8 as int16
            T.cast(T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x2"), dtype="int16"), 8),
                                 dtype="int8x16"), "int16x16"),
            B.vload([0, 0], dtype="int16x16"), dtype="int32x8",
        )


def _depthwise_desc(lanes: int):
    """Per lane, 4 products of the lane's own 4 activation bytes (packed in one int32: the rows of
    a depthwise window column) with the lane's 4 weights."""

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((lanes,), "int32", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i, k in T.grid(T.int64(lanes), T.int64(4)):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + (A[vi] >> T.Cast("int32", vk * T.int64(8)) & 255) * T.Cast("int32", B[vi, vk])

    return desc


def _depthwise_vnni_impl(lanes: int):
    """``vpdpbusd`` with both operands loaded per lane (no broadcast)."""
    width = {16: 512, 8: 256}[lanes]
    bytes_ = f"int8x{4 * lanes}"

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((lanes,), "int32", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(f"llvm.x86.avx512.vpdpbusd.{width}"),
                C.vload([0], dtype=f"int32x{lanes}"),
                T.reinterpret(A.vload([0], dtype=f"int32x{lanes}"), dtype=bytes_),
                B.vload([0, 0], dtype=bytes_),
                dtype=f"int32x{lanes}",
            )

    return impl


VNNI_16X4 = "edgeq_dot_16x4_vnni"
VNNI_8X4 = "edgeq_dot_8x4_vnni"
VNNI_DEPTHWISE_16X4 = "edgeq_depthwise_16x4_vnni"
VNNI_DEPTHWISE_8X4 = "edgeq_depthwise_8x4_vnni"
PMADDWD_8X2 = "edgeq_dot_8x2_pmaddwd"


@T.prim_func(s_tir=True)
def _sdot_4x4_impl(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((4, 4), "int8", offset_factor=1),
    C: T.Buffer((4,), "int32", offset_factor=1),
) -> None:
    """ARMv8.2 ``sdot``: each of 4 int32 lanes adds the dot product of 4 int8 activations with its 4 weights.

    edgeq's own copy of the instruction: importing TVM's ``tvm.s_tir.tensor_intrin`` package
    (which has one) registers every CUDA intrinsic too and costs tens of seconds per process.
    """
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
            C.vload([0], dtype="int32x4"),
            T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 4), dtype="int8x16"),
            B.vload([0, 0], dtype="int8x16"),
            dtype="int32x4",
        )


SDOT_4X4 = "edgeq_dot_4x4_sdot"


def _register() -> None:
    for name, desc, impl in (
        (VNNI_16X4, _desc(16, 4, "uint8", "int8"), _vnni_impl(16)),
        (VNNI_8X4, _desc(8, 4, "uint8", "int8"), _vnni_impl(8)),
        (PMADDWD_8X2, _desc(8, 2, "int8", "int16"), _pmaddwd_8x2_impl),
        (SDOT_4X4, _desc(4, 4, "int8", "int8"), _sdot_4x4_impl),
        (VNNI_DEPTHWISE_16X4, _depthwise_desc(16), _depthwise_vnni_impl(16)),
        (VNNI_DEPTHWISE_8X4, _depthwise_desc(8), _depthwise_vnni_impl(8)),
    ):
        try:
            TensorIntrin.get(name)
        except (RuntimeError, ValueError):
            TensorIntrin.register(name, desc, impl)


_register()

VNNI = (DotProduct(VNNI_16X4, 16, 4, "uint8", "int8"), DotProduct(VNNI_8X4, 8, 4, "uint8", "int8"))
# Depthwise kernels on VNNI: each lane's 4 bytes are a window column's rows (see _dot_depthwise).
VNNI_DEPTHWISE = (DotProduct(VNNI_DEPTHWISE_16X4, 16, 4, "uint8", "int8"),
                  DotProduct(VNNI_DEPTHWISE_8X4, 8, 4, "uint8", "int8"))
AVX2 = (DotProduct(PMADDWD_8X2, 8, 2, "int8", "int16", broadcast_cost=2),)  # vpbroadcastw + vpmovsxbw
SDOT = (DotProduct(SDOT_4X4, 4, 4, "int8", "int8"),)

# LLVM CPU names with AVX-512 VNNI.
_VNNI_CPUS = (
    "cascadelake", "cooperlake", "icelake", "tigerlake", "rocketlake", "sapphirerapids",
    "emeraldrapids", "graniterapids", "znver4", "znver5",
)


def dot_products(target: tvm.target.Target) -> tuple[DotProduct, ...]:
    """The dot-product instructions of an ``llvm`` target, widest first (empty if none)."""
    from .target import AVX2_CPUS, AVX512_CPUS

    attrs = target.attrs
    triple = str(attrs.get("mtriple", "") or "")
    mcpu = str(attrs.get("mcpu", "") or "")
    mattr = [str(a) for a in (attrs.get("mattr") or [])]
    if triple.startswith(("aarch64", "arm64")):
        return SDOT if ("+dotprod" in mattr or "+v8.4a" in mattr) else ()
    if triple.startswith(("arm", "thumb")):
        return ()
    if mcpu.startswith(_VNNI_CPUS) or "+avx512vnni" in mattr:
        return VNNI
    if mcpu.startswith(AVX512_CPUS + AVX2_CPUS) or "+avx2" in mattr or "+avx512f" in mattr:
        return AVX2
    return ()


# ---------------------------------------------------------------- Relax: packed weights


def _weight_values(weight: relax.Expr, dot: DotProduct) -> np.ndarray | None:
    """The constant weight as ``dot.weight_dtype`` if its values fit, else None."""
    if not isinstance(weight, tvm.ir.expr.GenericConst):
        return None
    values = weight.value.numpy()
    if values.dtype not in (np.int8, np.int16):
        return None
    if dot.weight_dtype == "int8" and (values.min() < -128 or values.max() > 127):
        return None
    return values.astype(dot.weight_dtype)


def _shape(expr: relax.Expr) -> tuple[int, ...] | None:
    shape = getattr(expr.ty, "shape", None)
    if shape is None or any(not isinstance(s, tirx.IntImm) for s in shape):
        return None
    return tuple(int(s) for s in shape)


def _pack(values: np.ndarray, depth: int) -> np.ndarray:
    """``W[..., c, f]`` -> ``W'[..., c // depth, f, c % depth]``."""
    *lead, channels, units = values.shape
    blocked = values.reshape(*lead, channels // depth, depth, units)
    return np.ascontiguousarray(np.swapaxes(blocked, -1, -2))


def _dot_conv2d(data: te.Tensor, packed: te.Tensor, strides, dilation) -> te.Tensor:
    n, height, width, _ = (int(s) for s in data.shape)
    kh, kw, blocks, units, depth = (int(s) for s in packed.shape)
    out_h = (height - (kh - 1) * dilation[0] - 1) // strides[0] + 1
    out_w = (width - (kw - 1) * dilation[1] - 1) // strides[1] + 1
    rh, rw = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw")
    rco, rci = te.reduce_axis((0, blocks), "rco"), te.reduce_axis((0, depth), "rci")
    return te.compute(
        (n, out_h, out_w, units),
        lambda b, y, x, f: te.sum(
            data[b, y * strides[0] + rh * dilation[0], x * strides[1] + rw * dilation[1], rco * depth + rci].astype("int32")
            * packed[rh, rw, rco, f, rci].astype("int32"),
            axis=[rh, rw, rco, rci],
        ),
        name="dot_conv2d",
    )


def _dot_conv2d_width_grouped(
    data: te.Tensor, packed: te.Tensor, strides, dilation_h: int, out_w: int, channels: int
) -> te.Tensor:
    """conv2d on an image with few channels, its rows flattened (``data`` is ``[N, H, W * C]``),
    whose reduction groups run along the row: group ``g`` of output pixel ``x`` is the ``depth``
    contiguous bytes from ``x * stride_w * C + g * depth``, the window row's taps x channels
    (zero-weighted past the filter's ``kw * C``)."""
    n, height, _ = (int(s) for s in data.shape)
    kh, _, blocks, units, depth = (int(s) for s in packed.shape)
    out_h = (height - (kh - 1) * dilation_h - 1) // strides[0] + 1
    rh = te.reduce_axis((0, kh), "rh")
    rco, rci = te.reduce_axis((0, blocks), "rco"), te.reduce_axis((0, depth), "rci")
    return te.compute(
        (n, out_h, out_w, units),
        lambda b, y, x, f: te.sum(
            data[b, y * strides[0] + rh * dilation_h, x * (strides[1] * channels) + rco * depth + rci].astype("int32")
            * packed[rh, 0, rco, f, rci].astype("int32"),
            axis=[rh, rco, rci],
        ),
        name="dot_conv2d",
    )


DEPTHWISE_ROWS = "depthwise_rows"
DEPTHWISE_CONV = "dot_depthwise"


def _dot_depthwise(data: te.Tensor, packed: te.Tensor, strides, dilation, kh: int) -> te.Tensor:
    """Depthwise conv2d on uint8 ``data`` [N, H, W, C] (channel multiplier 1) as per-lane dot
    products: ``depthwise_rows`` packs, for each output row, input pixel and channel, the window
    column's rows ``4g .. 4g+3`` into the bytes of one int32 (rows past ``kh`` are zero bytes);
    each output sums, over the window's columns and row groups, those 4 bytes times its channel's
    4 packed weights ``packed[col, g, c, 0..3]`` (``vpdpbusd`` with both operands per lane).
    The schedule computes the packed rows per tile, next to the accumulators that use them."""
    n, height, width, channels = (int(s) for s in data.shape)
    kw, blocks, _, depth = (int(s) for s in packed.shape)
    out_h = (height - (kh - 1) * dilation[0] - 1) // strides[0] + 1
    out_w = (width - (kw - 1) * dilation[1] - 1) // strides[1] + 1

    def pack(b, y, x, g, c):
        bytes_ = []
        for k in range(depth):
            tap = g * depth + k
            row = tirx.min(y * strides[0] + tap * dilation[0], height - 1)  # rows past kh: zero
            byte = tirx.Select(tap < kh, data[b, row, x, c].astype("int32"), tirx.const(0, "int32"))
            bytes_.append(byte << (8 * k) if k else byte)
        word = bytes_[0]
        for byte in bytes_[1:]:
            word = word | byte
        return word

    rows = te.compute((n, out_h, width, blocks, channels), pack, name=DEPTHWISE_ROWS)
    rw = te.reduce_axis((0, kw), "rw")
    rg = te.reduce_axis((0, blocks), "rg")
    rk = te.reduce_axis((0, tirx.const(depth, "int64")), "rk")
    return te.compute(
        (n, out_h, out_w, channels),
        lambda b, y, x, c: te.sum(
            (rows[b, y, x * strides[1] + rw * dilation[1], rg, c] >> (rk * tirx.const(8, "int64")).astype("int32") & 255)
            * packed[rw, rg, c, rk].astype("int32"),
            axis=[rw, rg, rk],
        ),
        name=DEPTHWISE_CONV,
    )


def _flatten_rows(data: te.Tensor) -> te.Tensor:
    """``[N, H, W, C]`` -> ``[N, H, W * C]`` (a view of the same bytes, written with simple indices)."""
    n, height, width, channels = (int(s) for s in data.shape)
    return te.compute(
        (n, height, width * channels), lambda b, y, k: data[b, y, k // channels, k % channels], name="rows"
    )


def _dot_matmul(data: te.Tensor, packed: te.Tensor) -> te.Tensor:
    rows = int(data.shape[0])
    blocks, units, depth = (int(s) for s in packed.shape)
    rco, rci = te.reduce_axis((0, blocks), "rco"), te.reduce_axis((0, depth), "rci")
    return te.compute(
        (rows, units),
        lambda i, f: te.sum(
            data[i, rco * depth + rci].astype("int32") * packed[rco, f, rci].astype("int32"), axis=[rco, rci]
        ),
        name="dot_matmul",
    )


@mutator
class _Packer(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, dot: DotProduct) -> None:
        super().__init__(mod)
        self.dot = dot
        self.rewritten = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
        call = super().visit_call_(call)
        name = getattr(call.op, "name", "")
        rewrite = {"relax.nn.conv2d": self._conv2d, "relax.matmul": self._matmul}.get(name)
        packed = rewrite(call) if rewrite is not None else None
        return call if packed is None else packed

    def _fits(self, data: relax.Expr, out_dtype: str, values: np.ndarray, pad_channels: bool = False) -> bool:
        """int8 data, int32 result, output channels in whole vectors and input channels in whole
        groups (or, with ``pad_channels``, any number: :meth:`_conv2d` pads them)."""
        channels, units = values.shape[-2:]
        return (
            str(getattr(data.ty, "dtype", "")) == "int8" and out_dtype == "int32"
            and (pad_channels or channels % self.dot.depth == 0) and units % self.dot.lanes == 0
        )

    def _conv2d(self, call: relax.Call) -> relax.Expr | None:
        data, weight = call.args
        attrs = call.attrs
        shape = _shape(data)
        if shape is None or len(shape) != 4 or any(int(p) for p in attrs.padding):
            return None
        if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != ("NHWC", "HWIO", "NHWC"):
            return None
        if int(attrs.groups) != 1:
            return self._depthwise(call)
        values = _weight_values(weight, self.dot)
        if values is None or values.ndim != 4 or not self._fits(data, str(attrs.out_dtype), values, pad_channels=True):
            return None
        strides = [int(s) for s in attrs.strides]
        dilation = [int(d) for d in attrs.dilation]
        kw, channels = values.shape[1], values.shape[2]
        missing = -channels % self.dot.depth
        if missing and channels < 4 and kw > 1 and dilation[1] == 1:
            grouped = self._width_grouped(data, values, strides, dilation[0])
            if grouped is not None:
                return grouped
        if missing >= channels:  # one or two input channels: a padded group would be mostly padding
            return None
        if missing:  # e.g. a 1x1 conv on 3 channels: 3 -> 4, a zero weight makes the 4th contribute nothing
            values = np.concatenate([values, np.zeros(values.shape[:2] + (missing, values.shape[3]), values.dtype)], axis=2)
            data = self.builder_.emit(R.nn.pad(data, [0, 0, 0, 0, 0, 0, 0, missing], pad_value=0.0))
        return self._emit(_dot_conv2d, data, values, strides, dilation)

    def _depthwise(self, call: relax.Call) -> relax.Expr | None:
        """A depthwise conv2d (one filter per channel) on VNNI: see :func:`_dot_depthwise`. The
        weights pack as ``[kw, row groups, C, 4]``; the activations shift to uint8 (x + 128) and
        -128 * sum(w) per channel goes back into the accumulator."""
        data, weight = call.args
        attrs = call.attrs
        channels = _shape(data)[3]
        values = _weight_values(weight, self.dot)
        if self.dot.data_dtype != "uint8" or values is None or values.ndim != 4:
            return None
        if str(getattr(data.ty, "dtype", "")) != "int8" or str(attrs.out_dtype) != "int32":
            return None
        if int(attrs.groups) != channels or values.shape[2:] != (1, channels) or channels % VNNI_DEPTHWISE[-1].lanes:
            return None
        kh, kw = values.shape[:2]
        depth = VNNI_DEPTHWISE[-1].depth
        blocks = -(-kh // depth)
        packed = np.zeros((kw, blocks * depth, channels), np.int8)
        packed[:, :kh] = values[:, :, 0, :].transpose(1, 0, 2)
        packed = packed.reshape(kw, blocks, depth, channels).transpose(0, 1, 3, 2)
        self.rewritten += 1
        acc = self.builder_.emit_te(
            _dot_depthwise, self._to_uint8(data), relax.const(np.ascontiguousarray(packed), "int8"),
            [int(s) for s in attrs.strides], [int(d) for d in attrs.dilation], kh, primfunc_name_hint=DEPTHWISE_CONV,
        )
        sums = values.astype(np.int64).sum(axis=(0, 1, 2))
        return R.add(acc, relax.const((-128 * sums).astype(np.int32), "int32"))

    def _width_grouped(self, data: relax.Expr, values: np.ndarray, strides, dilation_h: int) -> relax.Expr | None:
        """A conv on an image with few channels (a grayscale or RGB input), its dot-product groups
        taken along the flattened row: a window row's 3 taps x 1 channel are one group of 4 (the
        4th weight zero), 3 taps x 3 channels three groups of 4. The group's bytes are contiguous,
        so there is no gather and no channel padding."""
        _, _, width, channels = _shape(data)
        kh, kw, _, units = values.shape
        depth = self.dot.depth
        blocks = -(-kw * channels // depth)
        grouped = np.zeros((kh, 1, blocks * depth, units), values.dtype)
        grouped[:, 0, : kw * channels] = values.reshape(kh, kw * channels, units)
        out_w = (width - kw) // strides[1] + 1
        # The rows go flat, [N, H, W * C]; the pad (if any) after them, last in its kernel, so
        # that it keeps its border fill.
        pad = self._pad_source(data)
        if pad is not None and any(int(w) for w in pad.attrs.pad_width[6:]):
            return None  # a channel pad: not a plain image
        source = pad.args[0] if pad is not None else data
        widths = [int(w) for w in pad.attrs.pad_width][:6] if pad is not None else [0] * 6
        widths[4:6] = [widths[4] * channels, widths[5] * channels]
        value = float(pad.attrs.pad_value) if pad is not None else 0.0
        # The last pixel's last group may reach past the row: more bytes (their weights are zero).
        widths[5] += max((out_w - 1) * strides[1] * channels + blocks * depth - width * channels, 0)
        if self.dot.data_dtype == "uint8":
            source, value = self._to_uint8(source), value + 128.0
        if channels == 1:
            rows = self.builder_.emit(R.squeeze(source, [3]))
        else:
            rows = self.builder_.emit_te(_flatten_rows, source, primfunc_name_hint="rows")
        if any(widths):
            rows = self.builder_.emit(R.nn.pad(rows, widths, pad_value=value))
        return self._emit(
            _dot_conv2d_width_grouped, rows, grouped, strides, dilation_h, out_w, channels, shifted=True
        )

    def _pad_source(self, data: relax.Expr) -> relax.Call | None:
        """The constant ``nn.pad`` call bound to ``data``, if it is one."""
        source = self.lookup_binding(data) if isinstance(data, relax.Var) else None
        if isinstance(source, relax.Call) and getattr(source.op, "name", "") == "relax.nn.pad":
            if str(source.attrs.pad_mode) == "constant":
                return source
        return None

    def _to_uint8(self, data: relax.Expr) -> relax.Expr:
        """``data + 128`` as uint8. The shift of a padded tensor goes before the pad (whose value
        shifts too), so that the pad stays last in its kernel and keeps its cheap border fill."""
        pad = self._pad_source(data)
        if pad is not None:
            inner = self._to_uint8(pad.args[0])
            value = float(pad.attrs.pad_value) + 128.0
            return self.builder_.emit(R.nn.pad(inner, [int(w) for w in pad.attrs.pad_width], pad_value=value))
        return self.builder_.emit(R.astype(R.add(R.astype(data, "int16"), relax.const(128, "int16")), "uint8"))

    def _matmul(self, call: relax.Call) -> relax.Expr | None:
        data, weight = call.args
        shape = _shape(data)
        values = _weight_values(weight, self.dot)
        if shape is None or len(shape) != 2 or values is None or values.ndim != 2:
            return None
        if not self._fits(data, str(call.attrs.out_dtype), values):
            return None
        return self._emit(_dot_matmul, data, values)

    def _emit(self, kernel, data: relax.Expr, values: np.ndarray, *options, shifted: bool = False) -> relax.Expr:
        """``kernel`` (a TE compute) on ``data`` (shifted to uint8 here unless ``shifted``) and the packed ``values``."""
        self.rewritten += 1
        packed = relax.const(_pack(values, self.dot.depth), self.dot.weight_dtype)
        name = kernel.__name__.lstrip("_")
        if self.dot.data_dtype == "int8":  # returned unbound, so that FuseOps sees the call itself
            return self.builder_.call_te(kernel, data, packed, *options, primfunc_name_hint=name)
        # vpdpbusd multiplies unsigned by signed bytes: x + 128 as uint8, then -128 * sum(w).
        acc = self.builder_.emit_te(kernel, data if shifted else self._to_uint8(data), packed, *options, primfunc_name_hint=name)
        sums = values.reshape(-1, values.shape[-1]).astype(np.int64).sum(axis=0)
        return R.add(acc, relax.const((-128 * sums).astype(np.int32), "int32"))


@tvm.transform.module_pass(opt_level=0, name="edgeq.PackForDotProduct")
class PackForDotProduct:
    """Rewrite int8 conv2d / matmul with constant weights into packed-weight dot-product kernels."""

    def __init__(self, target: tvm.target.Target) -> None:
        self.dots = dot_products(target)

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if not self.dots:
            return mod
        packer = _Packer(mod, self.dots[-1])  # the narrowest: any channel count its lanes divide
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                packer.builder_.update_func(gvar, packer.visit_expr(func))
        if not packer.rewritten:
            return mod
        # A pad that a rewrite re-emitted (grown, or moved below the uint8 shift) is left unused.
        return relax.transform.DeadCodeElimination()(packer.builder_.get())


# ---------------------------------------------------------------- TIR: tensorize


def _realize_of(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV):
    loops = sch.get_loops(block)
    body = sch.get(loops[-1]).body if loops else None
    if isinstance(body, s_tir.SBlockRealize) and body.block.same_as(sch.get(block)):
        return body
    return None


def dot_for(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, dots, vec_tile: int) -> DotProduct | None:
    """The widest of ``dots`` that fits ``block`` (a packed dot-product kernel) and ``vec_tile``."""
    stmt = sch.get(block)
    store = stmt.body
    if not dots or not isinstance(store, tirx.BufferStore) or store.buffer.dtype != "int32":
        return None
    if stmt.name_hint == DEPTHWISE_CONV:
        usable = [d for d in VNNI_DEPTHWISE if vec_tile % d.lanes == 0] if dots == VNNI else []
        return usable[0] if usable else None
    value = store.value
    if not (isinstance(value, tirx.Add) and isinstance(value.b, tirx.Mul)):
        return None
    loads = [op.value for op in (value.b.a, value.b.b) if isinstance(op, tirx.Cast) and isinstance(op.value, TensorLoad)]
    if len(loads) != 2:
        return None
    data, weight = loads
    if len(weight.indices) < 3 or not weight.indices[-2].same_as(store.indices[-1]):
        return None
    inner = stmt.iter_vars[-1]
    if not (weight.indices[-1].same_as(inner.var) and inner.iter_type == tirx.IterVar.CommReduce):
        return None
    depth = int(weight.source.shape[-1])
    for dot in dots:
        if (dot.data_dtype, dot.weight_dtype, dot.depth) == (data.source.dtype, weight.source.dtype, depth) and vec_tile % dot.lanes == 0:
            return dot
    return None


def tensorize_dot(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, dot: DotProduct) -> None:
    """Tensorize the update ``block`` of a packed kernel whose innermost loop runs over output channels.

    The innermost reduction loop (``depth`` input channels) moves below the output channels,
    which split into unrolled groups of ``dot.lanes``; each group becomes one instruction.
    """
    realize = _realize_of(sch, block)
    loops = sch.get_loops(block)
    depth_var = realize.iter_values[-1]
    depth_loop = next(lp for lp in loops if sch.get(lp).loop_var.same_as(depth_var))
    groups, lanes = sch.split(loops[-1], [None, dot.lanes])
    sch.reorder(groups, lanes, depth_loop)
    if int(sch.get(groups).extent) > 1:
        sch.unroll(groups)
    sch.tensorize(lanes, dot.intrin)
