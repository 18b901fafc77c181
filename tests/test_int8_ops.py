"""Each integer lowering of edgeq.int8 against TFLite's reference kernels, on generated single-op models.

The reference is ai-edge-litert with OpResolverType.BUILTIN_REF (TFLite's reference kernels, which
define the integer semantics); outputs must be bit-identical.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
litert = pytest.importorskip("ai_edge_litert.interpreter")

from conftest import cpu_has  # noqa: E402
from edgeq.int8 import import_integer  # noqa: E402
from edgeq.tflite_builder import Q, TFLiteBuilder  # noqa: E402

TARGET = {"kind": "llvm"}
LIMITS = {"int8": (-128, 127), "uint8": (0, 255)}


def _inputs(interpreter, rng: np.random.Generator, trial: int) -> list[np.ndarray]:
    """Random inputs; trial 0 also pushes values to the type's extremes (saturation edge cases)."""
    arrays = []
    for detail in interpreter.get_input_details():
        shape, dtype = tuple(detail["shape"]), np.dtype(detail["dtype"])
        if dtype == np.float32:
            array = rng.normal(0.0, 3.0, shape).astype(np.float32)
            if trial == 0:
                array.flat[: max(1, array.size // 4)] = rng.choice([-1e4, 1e4, 0.5, -0.5, 2.5], max(1, array.size // 4))
        else:
            lo, hi = LIMITS[dtype.name]
            array = rng.integers(lo, hi + 1, shape).astype(dtype)
            if trial == 0:
                array.flat[: max(1, array.size // 4)] = rng.choice([lo, hi], max(1, array.size // 4))
        arrays.append(array)
    return arrays


def assert_matches_reference(builder: TFLiteBuilder, tmp_path, trials: int = 3, seed: int = 0, scheduled_for=None):
    """Compile the builder's model with import_integer and compare every output with BUILTIN_REF.

    ``scheduled_for``: a CPU target to build for with edgeq's schedules (default: TVM's plain build).
    """
    path = tmp_path / "model.tflite"
    path.write_bytes(builder.build())
    mod, report = import_integer(path)
    if scheduled_for is None:
        executable = tvm.compile(mod, target=tvm.target.Target(TARGET))
    else:
        from edgeq.schedules import build_cpu

        executable = build_cpu(mod, scheduled_for)
    vm = tvm.runtime.vm.VirtualMachine(executable, tvm.cpu())
    interpreter = litert.Interpreter(
        model_path=str(path), experimental_op_resolver_type=litert.OpResolverType.BUILTIN_REF
    )
    interpreter.allocate_tensors()
    rng = np.random.default_rng(seed)
    for trial in range(trials):
        arrays = _inputs(interpreter, rng, trial)
        for detail, array in zip(interpreter.get_input_details(), arrays):
            interpreter.set_tensor(detail["index"], array)
        interpreter.invoke()
        got = vm["main"](*[tvm.runtime.tensor(a) for a in arrays])
        for k, detail in enumerate(interpreter.get_output_details()):
            expected = interpreter.get_tensor(detail["index"])
            actual = got[k].numpy()
            assert actual.dtype == expected.dtype and actual.shape == expected.shape
            np.testing.assert_array_equal(actual, expected, err_msg=f"output {k}, trial {trial}")
    return report


def _rng(*params) -> np.random.Generator:
    """A generator seeded by the test parameters (stable across processes, unlike hash())."""
    return np.random.default_rng(zlib.crc32(repr(params).encode()))


def _activation_q(rng, dtype: str) -> Q:
    zp = int(rng.integers(-20, 20)) if dtype == "int8" else int(rng.integers(100, 156))
    return Q(float(rng.uniform(0.005, 0.1)), zp)


def _weights(rng, b: TFLiteBuilder, shape, dtype: str, per_channel: bool, axis: int):
    """int8 symmetric weights (per-channel or per-tensor) or uint8 asymmetric per-tensor weights."""
    channels = shape[axis]
    if dtype == "int8":
        scales = rng.uniform(0.002, 0.02, channels if per_channel else 1)
        data = rng.integers(-127, 128, shape).astype(np.int8)
        return b.constant(data, Q(list(scales), [0] * len(scales), axis=axis)), scales
    scale = rng.uniform(0.002, 0.02, 1)
    data = rng.integers(0, 256, shape).astype(np.uint8)
    return b.constant(data, Q(list(scale), [int(rng.integers(100, 156))])), scale


def _bias(rng, b: TFLiteBuilder, in_scale: float, w_scales: np.ndarray, channels: int):
    scales = np.float32(in_scale) * np.asarray(w_scales, np.float32)
    if scales.size == 1:
        scales = np.repeat(scales, 1)
    data = rng.integers(-3000, 3000, channels).astype(np.int32)
    return b.constant(data, Q([float(s) for s in scales], [0] * scales.size))


CONV_CASES = [
    # dtype, per_channel, padding, stride, dilation, activation
    ("int8", True, "SAME", 1, 1, "NONE"),
    ("int8", True, "SAME", 2, 1, "RELU"),
    ("int8", True, "VALID", 1, 2, "RELU6"),
    ("int8", False, "SAME", 2, 1, "RELU6"),
    ("int8", True, "VALID", 2, 1, "NONE"),
    ("uint8", False, "SAME", 1, 1, "RELU6"),
    ("uint8", False, "VALID", 2, 1, "NONE"),
]


@pytest.mark.parametrize("dtype,per_channel,padding,stride,dilation,activation", CONV_CASES)
def test_conv2d(tmp_path, dtype, per_channel, padding, stride, dilation, activation):
    rng = _rng(dtype, per_channel, padding, stride, dilation, activation)
    b = TFLiteBuilder()
    in_q = _activation_q(rng, dtype)
    h, w, cin, cout, k = int(rng.integers(5, 12)), int(rng.integers(5, 12)), int(rng.integers(1, 9)), int(rng.integers(1, 17)), int(rng.choice([1, 3, 5]))
    x = b.input((1, h, w, cin), dtype, in_q)
    wt, w_scales = _weights(rng, b, (cout, k, k, cin), dtype, per_channel, axis=0)
    bias = _bias(rng, b, in_q.scale, w_scales, cout)
    b.output(b.conv2d(x, wt, bias, _activation_q(rng, dtype), stride=stride, padding=padding, dilation=dilation, activation=activation))
    report = assert_matches_reference(b, tmp_path)
    assert report.ops_integer == report.ops_total == 1 and report.macs_integer == report.macs_total > 0


SCHEDULED_TARGETS = {
    "avx2": {"kind": "llvm", "mcpu": "haswell", "num-cores": 2},
    "vnni": {"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2},
}


def _host_runs(isa: str) -> bool:
    """Whether this machine can run code built for ``isa`` (AVX2, or AVX-512 VNNI)."""
    return cpu_has("avx512_vnni" if isa == "vnni" else "avx2")


@pytest.mark.parametrize("isa", sorted(SCHEDULED_TARGETS))
@pytest.mark.parametrize("case", ["unit-scale-channels", "huge-bias", "uint8", "depthwise"])
def test_conv_requantization_with_schedules(tmp_path, isa, case):
    """The scheduled epilogue (even/odd high multiply, the rounding shift with the zero point folded
    in where the weights bound the accumulator) equals TFLite's reference kernels, also for channels
    whose scale needs no rounding shift (multiplier in [0.5, 1)) and for a bias too large to bound."""
    if not _host_runs(isa):
        pytest.skip(f"this CPU cannot run {isa} code")
    rng = _rng("scheduled", case)
    b = TFLiteBuilder()
    dtype = "uint8" if case == "uint8" else "int8"
    in_q = Q(0.05, 7) if dtype == "int8" else Q(0.05, 131)
    cin, cout = (24, 24) if case == "depthwise" else (5, 40)
    x = b.input((1, 13, 17, cin), dtype, in_q)
    out_q = Q(0.001, -5) if dtype == "int8" else Q(0.02, 120)
    if case == "uint8":
        w_scales = np.array([0.004])
        wt = b.constant(rng.integers(0, 256, (cout, 3, 3, cin)).astype(np.uint8), Q([0.004], [128]))
    else:
        # every third channel's effective scale is in [0.5, 1): a multiplier with shift 0
        w_scales = np.where(np.arange(cout) % 3 == 0, 0.015, rng.uniform(0.0002, 0.002, cout))
        shape = (1, 3, 3, cout) if case == "depthwise" else (cout, 3, 3, cin)
        axis = 3 if case == "depthwise" else 0
        wt = b.constant(rng.integers(-127, 128, shape).astype(np.int8), Q(list(w_scales), [0] * cout, axis=axis))
    span = 1 << 30 if case == "huge-bias" else 3000
    bias_scales = np.float32(in_q.scale) * np.asarray(w_scales, np.float32) * np.ones(cout, np.float32)
    bias = b.constant(rng.integers(-span, span, cout).astype(np.int32),
                      Q([float(s) for s in bias_scales], [0] * cout))
    if case == "depthwise":
        y = b.depthwise_conv2d(x, wt, bias, out_q, stride=2, padding="SAME", activation="RELU")
    else:
        y = b.conv2d(x, wt, bias, out_q, stride=1, padding="SAME", activation="NONE")
    b.output(y)
    assert_matches_reference(b, tmp_path, scheduled_for=tvm.target.Target(SCHEDULED_TARGETS[isa]))


@pytest.mark.parametrize("dtype,multiplier,padding,stride,activation", [
    ("int8", 1, "SAME", 1, "RELU6"),
    ("int8", 2, "SAME", 2, "NONE"),
    ("int8", 3, "VALID", 1, "RELU"),
    ("uint8", 1, "SAME", 2, "RELU6"),
    ("uint8", 2, "VALID", 1, "NONE"),
])
def test_depthwise_conv2d(tmp_path, dtype, multiplier, padding, stride, activation):
    rng = _rng(dtype, multiplier, padding, stride, activation)
    b = TFLiteBuilder()
    in_q = _activation_q(rng, dtype)
    c, k = int(rng.integers(1, 9)), int(rng.choice([3, 5]))
    x = b.input((1, int(rng.integers(6, 13)), int(rng.integers(6, 13)), c), dtype, in_q)
    wt, w_scales = _weights(rng, b, (1, k, k, c * multiplier), dtype, per_channel=True, axis=3)
    bias = _bias(rng, b, in_q.scale, w_scales, c * multiplier)
    b.output(b.depthwise_conv2d(x, wt, bias, _activation_q(rng, dtype), stride=stride, padding=padding,
                                activation=activation, depth_multiplier=multiplier))
    assert_matches_reference(b, tmp_path)


@pytest.mark.parametrize("dtype,per_channel,activation,keep_num_dims", [
    ("int8", False, "NONE", False),
    ("int8", True, "RELU", False),
    ("int8", False, "RELU6", True),
    ("uint8", False, "NONE", False),
    ("uint8", False, "RELU", True),
])
def test_fully_connected(tmp_path, dtype, per_channel, activation, keep_num_dims):
    rng = _rng(dtype, per_channel, activation, keep_num_dims)
    b = TFLiteBuilder()
    in_q = _activation_q(rng, dtype)
    depth, units = int(rng.integers(4, 200)), int(rng.integers(1, 40))
    x = b.input((2, 3, depth) if keep_num_dims else (3, depth), dtype, in_q)
    wt, w_scales = _weights(rng, b, (units, depth), dtype, per_channel, axis=0)
    bias = _bias(rng, b, in_q.scale, w_scales, units)
    b.output(b.fully_connected(x, wt, bias, _activation_q(rng, dtype), activation=activation, keep_num_dims=keep_num_dims))
    assert_matches_reference(b, tmp_path)


@pytest.mark.parametrize("op", ["add", "sub", "mul"])
@pytest.mark.parametrize("dtype,broadcast,activation", [
    ("int8", False, "NONE"), ("int8", True, "RELU6"), ("uint8", False, "RELU"), ("uint8", True, "NONE"),
])
def test_binary(tmp_path, op, dtype, broadcast, activation):
    rng = _rng(op, dtype, broadcast, activation)
    b = TFLiteBuilder()
    shape = (1, 5, 6, 7)
    x = b.input(shape, dtype, _activation_q(rng, dtype))
    y = b.input((1, 1, 1, 7) if broadcast else shape, dtype, _activation_q(rng, dtype))
    out_q = Q(float(rng.uniform(0.02, 0.2)) if op != "mul" else float(rng.uniform(0.0005, 0.005)), _activation_q(rng, dtype).zero_point)
    b.output(getattr(b, op)(x, y, out_q, activation=activation))
    assert_matches_reference(b, tmp_path)


@pytest.mark.parametrize("isa", sorted(SCHEDULED_TARGETS))
@pytest.mark.parametrize("skip_zero_point", [0, -9])
def test_residual_add_runs_in_the_conv_tiles(tmp_path, isa, skip_zero_point):
    """A 1x1 conv whose output is added to the block's input (an inverted-residual block's
    projection, 24 channels) is one parallel loop of tiles with the ADD's requantization in each
    tile - the skip input's rescale ((x - zp) << 20, tiny blocks over the function's input, read
    twice by a requantization where the conv's scale is the larger one) included - and equals
    TFLite's reference kernels."""
    from edgeq.schedules import cpu_pipeline

    if not _host_runs(isa):
        pytest.skip(f"this CPU cannot run {isa} code")
    rng = _rng("residual", skip_zero_point)
    b = TFLiteBuilder()
    in_q = Q(0.05, skip_zero_point)
    x = b.input((1, 14, 14, 24), "int8", in_q)
    w_scales = rng.uniform(0.002, 0.02, 24)
    wt = b.constant(rng.integers(-127, 128, (24, 1, 1, 24)).astype(np.int8), Q(list(w_scales), [0] * 24, axis=0))
    y = b.conv2d(x, wt, _bias(rng, b, in_q.scale, w_scales, 24), Q(0.08, 3), padding="SAME")
    b.output(b.add(y, x, Q(0.06, -2)))
    target = tvm.target.Target(SCHEDULED_TARGETS[isa])
    assert_matches_reference(b, tmp_path, scheduled_for=target)
    mod, _ = import_integer(tmp_path / "model.tflite")
    lowered = cpu_pipeline(target)(mod)
    (conv,) = [f.script() for gv, f in lowered.functions_items() if "conv2d" in gv.name_hint]
    assert conv.count("T.parallel(") == 1


@pytest.mark.parametrize("kind", ["average", "max"])
@pytest.mark.parametrize("dtype,size,stride,padding,activation", [
    ("int8", 2, 2, "VALID", "NONE"),  # 4 and 16 elements per window: a rounding shift
    ("uint8", 4, 4, "VALID", "RELU"),
    ("int8", 3, 2, "SAME", "RELU"),
    ("int8", 3, 1, "SAME", "RELU6"),
    ("uint8", 3, 2, "SAME", "NONE"),
    ("int8", (7, 5), 1, "VALID", "NONE"),  # global
])
def test_pool2d(tmp_path, kind, dtype, size, stride, padding, activation):
    rng = _rng(kind, dtype, str(size), stride, padding, activation)
    b = TFLiteBuilder()
    x = b.input((1, 7, 5, 4) if size == (7, 5) else (1, int(rng.integers(6, 12)), int(rng.integers(6, 12)), 3), dtype, _activation_q(rng, dtype))
    pool = b.average_pool2d if kind == "average" else b.max_pool2d
    b.output(pool(x, size, stride, padding=padding, activation=activation))
    assert_matches_reference(b, tmp_path)


@pytest.mark.parametrize("dtype,axes,keep_dims", [("int8", (1, 2), True), ("int8", (3,), False), ("uint8", (1, 2), True), ("int8", (1,), True)])
def test_mean(tmp_path, dtype, axes, keep_dims):
    rng = _rng(dtype, axes, keep_dims)
    b = TFLiteBuilder()
    x = b.input((1, 6, 5, 8), dtype, _activation_q(rng, dtype))
    b.output(b.mean(x, axes, _activation_q(rng, dtype), keep_dims=keep_dims))
    assert_matches_reference(b, tmp_path)


@pytest.mark.parametrize("dtype,scale,beta", [("int8", 0.05, 1.0), ("int8", 0.25, 1.0), ("uint8", 0.1, 1.0), ("int8", 0.02, 0.5), ("uint8", 0.5, 2.0)])
def test_softmax(tmp_path, dtype, scale, beta):
    rng = _rng(dtype, scale, beta)
    b = TFLiteBuilder()
    x = b.input((2, 3, 17), dtype, Q(scale, _activation_q(rng, dtype).zero_point))
    b.output(b.softmax(x, beta=beta))
    assert_matches_reference(b, tmp_path)


@pytest.mark.parametrize("op", ["logistic", "tanh", "hard_swish"])
@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_unary_tables(tmp_path, op, dtype):
    rng = _rng(op, dtype)
    b = TFLiteBuilder()
    x = b.input((1, 4, 4, 16), dtype, Q(float(rng.uniform(0.02, 0.08)), _activation_q(rng, dtype).zero_point))
    b.output(b.hard_swish(x, _activation_q(rng, dtype)) if op == "hard_swish" else getattr(b, op)(x))
    assert_matches_reference(b, tmp_path, trials=2)


@pytest.mark.parametrize("kind", ["RELU", "RELU6", "RELU_N1_TO_1"])
@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_standalone_relu(tmp_path, kind, dtype):
    rng = _rng(kind, dtype)
    b = TFLiteBuilder()
    x = b.input((1, 4, 4, 8), dtype, _activation_q(rng, dtype))
    b.output(b.relu(x, kind, _activation_q(rng, dtype)))
    assert_matches_reference(b, tmp_path, trials=2)


@pytest.mark.parametrize("src,dst", [("float32", "int8"), ("float32", "uint8"), ("int8", "int8"), ("uint8", "int8"), ("int8", "uint8")])
def test_quantize(tmp_path, src, dst):
    rng = _rng(src, dst)
    b = TFLiteBuilder()
    x = b.input((1, 6, 6, 3), src, None if src == "float32" else _activation_q(rng, src))
    b.output(b.quantize(x, _activation_q(rng, dst), dtype=dst))
    report = assert_matches_reference(b, tmp_path)
    assert report.ops_integer == (0 if src == "float32" else 1)


@pytest.mark.parametrize(
    "src,dst,offset,table", [("uint8", "int8", -128, False), ("int8", "uint8", 128, False), ("uint8", "int8", -127, True)]
)
def test_requantize_at_the_same_scale_is_an_add(tmp_path, src, dst, offset, table):
    """A uint8 <-> int8 QUANTIZE at the same scale (a uint8 model's input, EfficientNet-Lite's) only
    moves the zero point: edgeq adds instead of looking each value up in a table. A shift by 127
    clamps 255 to 127: that one keeps its table."""
    b = TFLiteBuilder()
    zp = 130 if src == "uint8" else 2
    x = b.input((1, 6, 6, 3), src, Q(0.02, zp))
    b.output(b.quantize(x, Q(0.02, zp + offset), dtype=dst))
    assert_matches_reference(b, tmp_path)
    mod, _ = import_integer(tmp_path / "model.tflite")
    assert ("R.take" in mod.script()) == table


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_dequantize(tmp_path, dtype):
    rng = np.random.default_rng(7 if dtype == "int8" else 8)
    b = TFLiteBuilder()
    x = b.input((1, 5, 5, 3), dtype, _activation_q(rng, dtype))
    b.output(b.dequantize(x))
    assert_matches_reference(b, tmp_path)


@pytest.mark.parametrize("dtype,rescale", [("int8", False), ("uint8", False), ("uint8", True)])
def test_concatenation(tmp_path, dtype, rescale):
    rng = np.random.default_rng(11 if rescale else 12)
    b = TFLiteBuilder()
    q = _activation_q(rng, dtype)
    x = b.input((1, 4, 4, 3), dtype, q)
    y = b.input((1, 4, 4, 5), dtype, _activation_q(rng, dtype) if rescale else q)
    b.output(b.concatenation([x, y], axis=-1, out=q))
    assert_matches_reference(b, tmp_path)


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_data_movement(tmp_path, dtype):
    """PAD, TRANSPOSE, RESHAPE, SQUEEZE and RESIZE_NEAREST_NEIGHBOR chained."""
    rng = np.random.default_rng(21 if dtype == "int8" else 22)
    b = TFLiteBuilder()
    x = b.input((1, 5, 6, 4), dtype, _activation_q(rng, dtype))
    y = b.pad(x, [[0, 0], [1, 2], [2, 1], [0, 0]])
    y = b.resize_nearest(y, (11, 7), half_pixel_centers=True)
    y = b.transpose(y, (0, 2, 1, 3))
    y = b.reshape(y, (1, 7, 11 * 4, 1))
    b.output(b.squeeze(y, (0, 3)))
    assert_matches_reference(b, tmp_path)


def test_small_network_with_float_io(tmp_path):
    """QUANTIZE -> conv -> depthwise -> add -> pool -> FC -> softmax -> DEQUANTIZE, like the shared models."""
    rng = np.random.default_rng(5)
    b = TFLiteBuilder()
    x = b.input((1, 12, 12, 3), "float32")
    q0 = Q(0.03, -9)
    x8 = b.quantize(x, q0)
    w, ws = _weights(rng, b, (8, 3, 3, 3), "int8", True, 0)
    c1 = b.conv2d(x8, w, _bias(rng, b, q0.scale, ws, 8), Q(0.04, -128), stride=2, activation="RELU6")
    dw, dws = _weights(rng, b, (1, 3, 3, 8), "int8", True, 3)
    c2 = b.depthwise_conv2d(c1, dw, _bias(rng, b, 0.04, dws, 8), Q(0.05, -3))
    s = b.add(c1, c2, Q(0.06, -10), activation="RELU")
    p = b.average_pool2d(s, (6, 6))
    f = b.reshape(p, (1, 8))
    fw, fws = _weights(rng, b, (4, 8), "int8", False, 0)
    logits = b.fully_connected(f, fw, _bias(rng, b, 0.06, fws, 4), Q(0.1, 2))
    b.output(b.dequantize(b.softmax(logits)))
    report = assert_matches_reference(b, tmp_path)
    assert [name for name, _ in report.float_ops] == ["QUANTIZE", "DEQUANTIZE"]
    assert report.macs_integer == report.macs_total > 0


def _leaky_relu(b: TFLiteBuilder, y: int, out: Q) -> int:
    return b.op_output(b.shape(y), "LEAKY_RELU", [y], dtype=b.dtype(y), quant=out, Alpha=0.2)


def _resize_bilinear(b: TFLiteBuilder, y: int, _out: Q) -> int:
    n, h, w, c = b.shape(y)
    size = b.constant(np.array([2 * h - 1, 2 * w + 3], np.int32))
    # TFLite keeps the input's quantization
    return b.op_output((n, 2 * h - 1, 2 * w + 3, c), "RESIZE_BILINEAR", [y, size], dtype=b.dtype(y), quant=b.quant(y),
                       AlignCorners=False, HalfPixelCenters=True)


@pytest.mark.parametrize("op, max_steps", [("LEAKY_RELU", 1), ("RESIZE_BILINEAR", 2)])
@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_op_without_integer_kernel_falls_back_alone(tmp_path, op, max_steps, dtype):
    """An op edgeq has no integer kernel for runs in TVM's dequantize -> float -> quantize; the ops
    around it keep edgeq's bit-exact kernels, and the report names it. (TFLite's integer bilinear
    resize interpolates in 10-bit fixed point: the float path lands up to 2 steps away.)"""
    rng = _rng(op, dtype)
    zp = 0 if dtype == "int8" else 128
    b = TFLiteBuilder()
    x = b.input((1, 9, 7, 4), dtype, Q(0.05, zp - 3))
    w, ws = _weights(rng, b, (8, 3, 3, 4), "int8" if dtype == "int8" else "uint8", dtype == "int8", 0)
    conv = b.conv2d(x, w, _bias(rng, b, 0.05, ws, 8), Q(0.08, zp - 5))
    lowered = {"LEAKY_RELU": _leaky_relu, "RESIZE_BILINEAR": _resize_bilinear}[op](b, conv, Q(0.07, zp + 4))
    b.output(conv)
    b.output(lowered)
    path = tmp_path / "model.tflite"
    path.write_bytes(b.build())

    mod, report = import_integer(path)
    assert report.ops_integer == report.ops_total - 1
    assert [name for name, _ in report.float_ops] == [op]
    assert "TVM's dequantize -> float -> quantize" in report.float_ops[0][1]
    assert report.macs_integer == report.macs_total > 0

    vm = tvm.runtime.vm.VirtualMachine(tvm.compile(mod, target=tvm.target.Target(TARGET)), tvm.cpu())
    interpreter = litert.Interpreter(model_path=str(path), experimental_op_resolver_type=litert.OpResolverType.BUILTIN_REF)
    interpreter.allocate_tensors()
    for trial in range(3):
        arrays = _inputs(interpreter, rng, trial)
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], arrays[0])
        interpreter.invoke()
        got = vm["main"](tvm.runtime.tensor(arrays[0]))
        conv_ref, op_ref = (interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details())
        np.testing.assert_array_equal(got[0].numpy(), conv_ref)  # the integer conv stays exact
        steps = np.abs(got[1].numpy().astype(np.int32) - op_ref.astype(np.int32))
        assert steps.max() <= max_steps and np.mean(steps == 0) >= 0.7, (steps.max(), np.mean(steps == 0))


@pytest.mark.parametrize("adj_x, adj_y", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("constant_rhs", [False, True])
def test_batch_matmul(tmp_path, adj_x, adj_y, constant_rhs):
    rng = _rng("bmm", adj_x, adj_y, constant_rhs)
    b = TFLiteBuilder()
    lhs_shape = (2, 3, 5, 7)[:2] + ((7, 5) if adj_x else (5, 7))
    rhs_shape = (1, 3) + ((6, 7) if adj_y else (7, 6))
    lhs = b.input(lhs_shape, "int8", Q(0.04, -7))
    rq = Q(0.03, 5)
    rhs = (b.constant(rng.integers(-128, 128, rhs_shape).astype(np.int8), rq) if constant_rhs
           else b.input(rhs_shape, "int8", rq))
    out = b.tensor((2, 3, 5, 6), "int8", Q(0.3, -2))
    b.op("BATCH_MATMUL", [lhs, rhs], [out], AdjX=adj_x, AdjY=adj_y)
    b.output(out)
    report = assert_matches_reference(b, tmp_path)
    assert report.macs_integer == report.macs_total == 2 * 3 * 5 * 6 * 7
