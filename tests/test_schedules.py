"""edgeq.schedules: default CPU schedules are applied and change no output."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax

from conftest import cpu_has, shared_path
from edgeq.schedules import build_cpu, cpu_pipeline
from edgeq.schedules.rules import DEFAULT_KNOBS, KNOB_CANDIDATES, ScheduleKnobs

X86 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
VNNI = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2})
AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})
AARCH64 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]})
RNG = np.random.default_rng(7)


def _int8(*shape: int) -> np.ndarray:
    return RNG.integers(-128, 128, size=shape).astype("int8")


def _requant(bb: relax.BlockBuilder, acc: relax.Expr, multiplier: int, shift: int) -> relax.Expr:
    """int32 accumulator -> int8: x * multiplier >> shift (rounding), clip, cast (TFLite-like)."""
    wide = bb.emit(relax.op.multiply(relax.op.astype(acc, "int64"), relax.const(multiplier, "int64")))
    rounded = bb.emit(relax.op.add(wide, relax.const(1 << (shift - 1), "int64")))
    shifted = bb.emit(relax.op.right_shift(rounded, relax.const(shift, "int64")))
    return bb.emit(relax.op.astype(relax.op.clip(shifted, -128, 127), "int8"))


def _module(x_shape: tuple[int, ...], body: object) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, x))
        bb.emit_func_output(out)
    return bb.get()


def conv_module(kernel_layout: str = "OHWI", stride: int = 1) -> tvm.IRModule:
    """3x3 int8 conv2d NHWC, out_dtype int32, bias, integer requantization."""
    weight = _int8(32, 3, 3, 16) if kernel_layout == "OHWI" else _int8(3, 3, 16, 32)
    bias = RNG.integers(-2000, 2000, size=(32,)).astype("int32")

    def body(bb: relax.BlockBuilder, x: relax.Var) -> relax.Expr:
        acc = bb.emit(relax.op.nn.conv2d(x, relax.const(weight), strides=stride, padding=1, data_layout="NHWC",
                                         kernel_layout=kernel_layout, out_dtype="int32"))
        acc = bb.emit(relax.op.add(acc, relax.const(bias)))
        return _requant(bb, acc, 1_518_500_250, 40)

    return _module((1, 14, 14, 16), body)


def float_conv_module() -> tvm.IRModule:
    """3x3 float32 conv2d NHWC with 64 output channels, bias and ReLU."""
    weight = RNG.standard_normal((3, 3, 16, 64)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 14, 14, 16), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            acc = bb.emit(relax.op.nn.conv2d(x, relax.const(weight), padding=1, data_layout="NHWC",
                                             kernel_layout="HWIO"))
            out = bb.emit_output(relax.op.nn.relu(relax.op.add(acc, relax.const(RNG.standard_normal(64).astype("float32")))))
        bb.emit_func_output(out)
    return bb.get()


def float_dense_module() -> tvm.IRModule:
    """float32 (1, 256) x (256, 128) matmul with bias."""
    weight = RNG.standard_normal((256, 128)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 256), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            acc = bb.emit(relax.op.matmul(x, relax.const(weight)))
            out = bb.emit_output(relax.op.add(acc, relax.const(RNG.standard_normal(128).astype("float32"))))
        bb.emit_func_output(out)
    return bb.get()


def conv_padded_output_module(before: int = 0) -> tvm.IRModule:
    """Conv + requant whose fused epilogue ends in the next layer's padding (a larger domain),
    ``before`` rows and columns before the data (shifted indices) and one after."""
    weight = _int8(32, 3, 3, 16)

    def body(bb: relax.BlockBuilder, x: relax.Var) -> relax.Expr:
        acc = bb.emit(relax.op.nn.conv2d(x, relax.const(weight), padding=1, data_layout="NHWC",
                                         kernel_layout="OHWI", out_dtype="int32"))
        out = _requant(bb, acc, 1_518_500_250, 40)
        return bb.emit(relax.op.nn.pad(out, pad_width=[0, 0, before, 1, before, 1, 0, 0], pad_value=-7.0))

    return _module((1, 14, 14, 16), body)


def stem_module() -> tvm.IRModule:
    """An RGB stem: explicitly padded 3-channel input, 3x3 stride-2 conv to 32 channels (the dot
    kernels take a window row's 3 taps x 3 channels as their groups)."""
    weight = _int8(3, 3, 3, 32)

    def body(bb: relax.BlockBuilder, x: relax.Var) -> relax.Expr:
        padded = bb.emit(relax.op.nn.pad(x, pad_width=[0, 0, 0, 1, 0, 1, 0, 0], pad_value=-5.0))
        acc = bb.emit(relax.op.nn.conv2d(padded, relax.const(weight), strides=2, data_layout="NHWC",
                                         kernel_layout="HWIO", out_dtype="int32"))
        return _requant(bb, acc, 1_400_000_000, 37)

    return _module((1, 24, 24, 3), body)


def grayscale_module(kernel: int = 3, stride: int = 2, channels: int = 24) -> tvm.IRModule:
    """A one-channel image (explicitly padded) into a ``kernel`` x ``kernel`` conv: the dot kernels
    group its width taps instead of padding the channel to the group size."""
    weight = _int8(kernel, kernel, 1, channels)

    def body(bb: relax.BlockBuilder, x: relax.Var) -> relax.Expr:
        padded = bb.emit(relax.op.nn.pad(x, pad_width=[0, 0, 1, 1, 1, 1, 0, 0], pad_value=-9.0))
        acc = bb.emit(relax.op.nn.conv2d(padded, relax.const(weight), strides=stride, data_layout="NHWC",
                                         kernel_layout="HWIO", out_dtype="int32"))
        return _requant(bb, acc, 1_400_000_000, 36)

    return _module((1, 31, 32, 1), body)


def depthwise_module() -> tvm.IRModule:
    """3x3 depthwise (groups = channels) int8 conv2d, stride 2, integer requantization."""
    weight = _int8(3, 3, 24, 1)

    def body(bb: relax.BlockBuilder, x: relax.Var) -> relax.Expr:
        acc = bb.emit(relax.op.nn.conv2d(x, relax.const(weight), strides=2, padding=1, groups=24,
                                         data_layout="NHWC", kernel_layout="HWOI", out_dtype="int32"))
        return _requant(bb, acc, 1_200_000_000, 36)

    return _module((1, 20, 20, 24), body)


def depthwise_hwio_module(kernel: int = 3, stride: int = 1, channels: int = 32, dilation: int = 1) -> tvm.IRModule:
    """A depthwise conv as edgeq's integer lowering emits it: explicit pad (the input zero point),
    HWIO filter [k, k, 1, C], groups = C. On VNNI its window columns run on vpdpbusd."""
    weight = _int8(kernel, kernel, 1, channels)

    def body(bb: relax.BlockBuilder, x: relax.Var) -> relax.Expr:
        half = kernel // 2 * dilation
        padded = bb.emit(relax.op.nn.pad(x, pad_width=[0, 0, half, half, half, half, 0, 0], pad_value=-3.0))
        acc = bb.emit(relax.op.nn.conv2d(padded, relax.const(weight), strides=stride, dilation=dilation,
                                         groups=channels, data_layout="NHWC", kernel_layout="HWIO",
                                         out_dtype="int32"))
        return _requant(bb, acc, 1_300_000_000, 37)

    return _module((1, 17, 19, channels), body)


def dense_module(columns: int = 40) -> tvm.IRModule:
    """int8 (1, 256) x (256, columns) matmul to int32, integer requantization."""
    weight = _int8(256, columns)

    def body(bb: relax.BlockBuilder, x: relax.Var) -> relax.Expr:
        acc = bb.emit(relax.op.matmul(x, relax.const(weight), out_dtype="int32"))
        return _requant(bb, acc, 1_300_000_000, 42)

    return _module((1, 256), body)


def pointwise_module() -> tvm.IRModule:
    """1x1 int8 conv2d (HWIO, as edgeq's integer lowering emits it), 32 -> 48 channels, requantized."""
    weight = _int8(1, 1, 32, 48)

    def body(bb: relax.BlockBuilder, x: relax.Var) -> relax.Expr:
        acc = bb.emit(relax.op.nn.conv2d(x, relax.const(weight), data_layout="NHWC", kernel_layout="HWIO",
                                         out_dtype="int32"))
        return _requant(bb, acc, 1_400_000_000, 38)

    return _module((1, 14, 14, 32), body)


def _host_has(target: tvm.target.Target) -> bool:
    """Whether this machine can run code built for ``target`` (x86 only: AVX2, AVX-512 or AVX-512 VNNI)."""
    return cpu_has({"cascadelake": "avx512_vnni", "skylake-avx512": "avx512f"}.get(str(target.attrs.get("mcpu", "")), "avx2"))


def _run(executable: relax.Executable, inputs: list[np.ndarray]) -> list[np.ndarray]:
    dev = tvm.cpu()
    out = relax.VirtualMachine(executable, dev)["main"](*[tvm.runtime.tensor(x, dev) for x in inputs])

    def flat(o: object) -> list[np.ndarray]:
        return [o.numpy()] if hasattr(o, "numpy") else [a for item in o for a in flat(item)]

    return flat(out)


def _random_inputs(mod: tvm.IRModule) -> list[np.ndarray]:
    out = []
    for param in mod["main"].params:
        shape, dtype = [int(s) for s in param.ty.shape], str(param.ty.dtype)
        out.append(_int8(*shape).astype(dtype) if "int" in dtype else RNG.standard_normal(shape).astype(dtype))
    return out


def _scheduled_prim_funcs(mod: tvm.IRModule, target: tvm.target.Target) -> dict[str, str]:
    lowered = cpu_pipeline(target)(mod)
    return {gv.name_hint: f.script() for gv, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


@pytest.mark.parametrize("knobs", KNOB_CANDIDATES, ids=lambda k: ",".join(
    f"{n}={v}" for n, v in k.to_dict().items() if v != DEFAULT_KNOBS.to_dict()[n]))
def test_every_tile_choice_tune_tries_is_bit_identical(knobs: ScheduleKnobs) -> None:
    """`edgeq tune` may package any of these tile choices: each changes some kernel's schedule (on
    AVX-512 VNNI, whose 32 registers fit every choice) and none changes an output."""
    target = VNNI if _host_has(VNNI) else X86
    changed = 0
    for make in (lambda: grayscale_module(channels=24), lambda: grayscale_module(kernel=5, stride=1, channels=16),
                 lambda: depthwise_hwio_module(channels=24), lambda: conv_module("HWIO", stride=2),
                 pointwise_module, float_conv_module, float_dense_module):
        mod = make()
        changed += not tvm_ffi.structural_equal(cpu_pipeline(VNNI)(mod), cpu_pipeline(VNNI, knobs=knobs)(mod))
        inputs = _random_inputs(mod)
        for got, want in zip(_run(build_cpu(mod, target, knobs=knobs), inputs), _run(build_cpu(mod, target), inputs)):
            np.testing.assert_array_equal(got, want)  # float too: tiles do not reorder a sum
    assert changed, f"{knobs} changes none of these kernels' schedules"


def test_the_schedule_pass_leaves_its_input_module_alone() -> None:
    from edgeq.schedules import ScheduleCPU, kernel_passes

    with X86:
        mod = tvm.transform.Sequential(kernel_passes(X86))(conv_module())
    before = {gv.name_hint: f for gv, f in mod.functions_items()}
    scheduled = ScheduleCPU(X86).transform_module(mod, None)
    assert {gv.name_hint: f for gv, f in mod.functions_items()} == before  # same objects: untouched
    assert any(isinstance(f, tvm.tirx.PrimFunc) and f.attrs.get("tirx.is_scheduled") for _, f in scheduled.functions_items())


@pytest.mark.parametrize("target", [X86, AARCH64], ids=["avx2", "neon"])
def test_conv_is_parallel_and_vectorized(target: tvm.target.Target) -> None:
    funcs = _scheduled_prim_funcs(conv_module(), target)
    conv = [text for name, text in funcs.items() if "conv2d" in name]
    assert conv, f"no conv2d PrimFunc in {sorted(funcs)}"
    assert all("T.parallel(" in text and "T.vectorized(" in text for text in conv)
    assert all('"tirx.is_scheduled": True' in text for text in conv)


def test_builds_for_aarch64_neon() -> None:
    assert build_cpu(depthwise_module(), AARCH64) is not None


@pytest.mark.parametrize("target", [X86, VNNI], ids=["avx2", "vnni"])
@pytest.mark.parametrize(
    "make",
    [conv_module, lambda: conv_module("HWIO", stride=2), conv_padded_output_module,
     lambda: conv_padded_output_module(before=1), depthwise_module, dense_module, pointwise_module, stem_module,
     grayscale_module, lambda: grayscale_module(kernel=5, stride=1, channels=16), depthwise_hwio_module,
     lambda: depthwise_hwio_module(kernel=5, stride=2, channels=48), lambda: depthwise_hwio_module(channels=24),
     lambda: depthwise_hwio_module(dilation=2)],
    ids=["conv-ohwi", "conv-hwio-s2", "conv-padded-output", "conv-padded-output-shifted", "depthwise", "dense",
         "pointwise", "stem", "grayscale-3x3-s2", "grayscale-5x5", "depthwise-3x3", "depthwise-5x5-s2",
         "depthwise-24", "depthwise-dilated"],
)
def test_int8_outputs_bit_identical(make: object, target: tvm.target.Target) -> None:
    if not _host_has(target):
        pytest.skip(f"this CPU cannot run {target.attrs['mcpu']} code")
    mod = make()
    inputs = _random_inputs(mod)
    scheduled = _run(build_cpu(mod, target), inputs)
    reference = _run(tvm.compile(mod, target=X86), inputs)
    assert scheduled[0].dtype == np.int8 and np.unique(reference[0]).size > 16  # requant not saturated
    for got, want in zip(scheduled, reference):
        np.testing.assert_array_equal(got, want)


def test_float_rps96_matches_unscheduled() -> None:
    import tflite
    import tvm.relax.frontend.tflite  # noqa: F401

    path = shared_path("models", "tflite", "mltk_rps96_float32.tflite")
    mod = tvm.relax.frontend.tflite.from_tflite(tflite.Model.GetRootAsModel(path.read_bytes(), 0))
    inputs = _random_inputs(mod)
    for got, want in zip(_run(build_cpu(mod, X86), inputs), _run(tvm.compile(mod, target=X86), inputs)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target,instruction", [(X86, "vpmaddwd"), (VNNI, "vpdpbusd")], ids=["avx2", "vnni"])
@pytest.mark.parametrize("make", [pointwise_module, dense_module, stem_module, grayscale_module],
                         ids=["pointwise", "dense", "stem", "grayscale"])
def test_int8_kernels_use_dot_product_instructions(make: object, target: tvm.target.Target, instruction: str,
                                                   tmp_path: Path) -> None:
    """1x1 conv, dense, a 3-channel stem and a one-channel image's conv run on the ISA's integer
    dot product: VNNI vpdpbusd, else AVX2 vpmaddwd."""
    if shutil.which("objdump") is None:
        pytest.skip("objdump missing (binutils)")
    library = tmp_path / "lib.so"
    build_cpu(make(), target).export_library(str(library))
    listing = subprocess.run(["objdump", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    assert re.search(rf"\t{instruction}\s", listing), f"no {instruction} in the {target.attrs['mcpu']} library"


def test_depthwise_runs_window_columns_on_vnni(tmp_path: Path) -> None:
    """On VNNI a depthwise conv packs each window column's rows into the bytes of one int32 per
    channel, per tile of the output (not as a whole tensor), and takes 4 rows a vpdpbusd."""
    funcs = _scheduled_prim_funcs(depthwise_hwio_module(kernel=5), VNNI)
    (conv,) = [text for name, text in funcs.items() if "depthwise" in name]
    tiles = conv[conv.index("T.parallel(") :]
    assert 'sblock("depthwise_rows")' in tiles and "llvm.x86.avx512.vpdpbusd" in tiles
    if shutil.which("objdump") is None:
        pytest.skip("objdump missing (binutils)")
    library = tmp_path / "lib.so"
    build_cpu(depthwise_hwio_module(kernel=5), VNNI).export_library(str(library))
    listing = subprocess.run(["objdump", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    assert re.search(r"\tvpdpbusd\s", listing) and not re.search(r"\tvpmulld\s", listing)


def _reverse_halves(half: int) -> tvm.IRModule:
    """Each of two parallel tasks reverses its half of ``a`` through a buffer of ``half`` int32."""
    from tvm.script import tirx as T

    @T.prim_func
    def main(a: T.Buffer((2 * half,), "int32"), b: T.Buffer((2 * half,), "int32")):
        for i in T.parallel(2):
            tmp = T.alloc_buffer((half,), "int32")
            for j in range(half):
                tmp[j] = a[i * half + j] * 2
            for j in range(half):
                b[i * half + j] = tmp[half - 1 - j] + 1

    return tvm.IRModule({"main": main})


def _source(lib: object, kind: str) -> str:
    """A compiled library's LLVM IR (``"ll"``) or assembly (``"asm"``)."""
    return (lib.inspect_source if hasattr(lib, "inspect_source") else lib.mod.inspect_source)(kind)


def _workspace_calls(lib: object) -> int:
    return len(re.findall(r"load ptr, ptr @__TVMBackendAllocWorkspace", _source(lib, "ll")))


@pytest.mark.parametrize("target", [X86, AARCH64], ids=["x86", "aarch64"])
@pytest.mark.parametrize("half,on_stack", [(200, True), (1024, True), (4096, True), (16384, False)])
def test_tile_buffers_stay_on_the_stack(target: tvm.target.Target, half: int, on_stack: bool) -> None:
    """A temporary buffer up to 16 KiB lives in the stack frame (TVM's own limit is 1 KiB: above
    it, a pool allocation and release every time the loop body runs); a larger one still comes
    from TVM's workspace pool."""
    from edgeq.schedules.pipeline import tir_pipeline_for

    lib = tvm.compile(_reverse_halves(half), target=target, tir_pipeline=tir_pipeline_for(target))
    assert (_workspace_calls(lib) == 0) == on_stack
    if target is X86:
        a = np.arange(2 * half, dtype=np.int32)
        b = tvm.runtime.tensor(np.zeros_like(a))
        lib["main"](tvm.runtime.tensor(a), b)
        np.testing.assert_array_equal(b.numpy(), np.concatenate([a[:half][::-1], a[half:][::-1]]) * 2 + 1)


def test_depthwise_tiles_pack_rows_without_the_workspace_pool() -> None:
    """EfficientNet-Lite0's 5x5 depthwise tiles pack 1-4 KiB of window rows each: on the stack."""
    from edgeq.schedules.pipeline import tir_pipeline_for

    funcs = cpu_pipeline(VNNI)(depthwise_hwio_module(kernel=5))
    (name,) = [gv.name_hint for gv, f in funcs.functions_items() if "depthwise" in gv.name_hint]
    func = funcs[name].with_attr("global_symbol", "main")
    assert "depthwise_rows = T.sblock_alloc_buffer" in func.script()
    lib = tvm.compile(tvm.IRModule({"main": func}), target=VNNI, tir_pipeline=tir_pipeline_for(VNNI))
    assert _workspace_calls(lib) == 0
    stock = tvm.compile(tvm.IRModule({"main": func}), target=VNNI)  # TVM's lowering: pool allocations
    assert _workspace_calls(stock) > 0


@pytest.mark.slow
@pytest.mark.parametrize("target", [X86, VNNI], ids=["avx2", "vnni"])
def test_efficientnet_with_dot_products_matches_reference_kernels(target: tvm.target.Target) -> None:
    """EfficientNet-Lite0 uint8 built with the dot-product kernels equals TFLite's reference kernels exactly."""
    from edgeq.int8 import import_integer
    from edgeq.reference import ReferenceInterpreter

    if not _host_has(target):
        pytest.skip(f"this CPU cannot run {target.attrs['mcpu']} code")
    path = shared_path("models", "tflite", "efficientnet_lite0_uint8.tflite")
    mod, _report = import_integer(path)
    x = np.random.default_rng(3).integers(0, 256, size=(1, 224, 224, 3)).astype(np.uint8)
    got = _run(build_cpu(mod, target), [x])[0]
    want = ReferenceInterpreter(path).run(x)[0]
    assert np.count_nonzero(want) > 8  # a spread of class scores, not one saturated class
    np.testing.assert_array_equal(got.reshape(want.shape), want)


def test_padding_joins_the_producing_kernel() -> None:
    """A pad after a conv is fused into the conv's kernel, and its interior is written inside the
    conv's parallel tiles (no separate pad kernel, no full-size int32 accumulator); the pad value
    is written first into the border only: two 16 x 32 rows and two 14 x 32 column strips."""
    funcs = _scheduled_prim_funcs(conv_padded_output_module(before=1), VNNI)
    assert not [name for name in funcs if name.startswith("pad")], sorted(funcs)
    (conv,) = [text for name, text in funcs.items() if "conv2d" in name and "pad" in name]
    fill, tiles = conv[: conv.rindex("T.parallel(")], conv[conv.rindex("T.parallel(") :]
    assert fill.count("= T.int8(-7)") == 4 and "= T.int8(-7)" not in tiles
    assert fill.count("T.grid(T.int64(1), T.int64(1), T.int64(16), T.int64(32))") == 2
    assert fill.count("T.grid(T.int64(1), T.int64(14), T.int64(1), T.int64(32))") == 2
    assert 'conv2d_nhwc_update")' in tiles and 'sblock("PadInput")' in tiles


def test_three_channel_elementwise_is_vectorized_across_pixels() -> None:
    """An RGB image's elementwise kernel (3 channels, narrower than a vector) runs its pixels' channels
    as one contiguous vectorized run; a per-channel constant keeps the loops apart (it would gather),
    and the channel loop is unrolled instead."""
    def module(per_channel: bool) -> tvm.IRModule:
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((1, 48, 48, 3), "float32"))
        scale = relax.const(np.array([0.5, 0.25, 2.0] if per_channel else 0.5, "float32"))
        with bb.function("main", [x]):
            with bb.dataflow():
                out = bb.emit_output(relax.op.astype(relax.op.multiply(x, scale), "int32"))
            bb.emit_func_output(out)
        return bb.get()

    (scalar,) = _scheduled_prim_funcs(module(False), X86).values()
    assert "T.vectorized(" in scalar and "T.parallel(" in scalar
    (channels,) = _scheduled_prim_funcs(module(True), X86).values()
    assert "T.vectorized(" not in channels and "T.unroll(" in channels  # 3 channels unrolled, pixels parallel
    inputs = _random_inputs(module(False))
    np.testing.assert_array_equal(_run(build_cpu(module(False), X86), inputs)[0],
                                  _run(tvm.compile(module(False), target=X86), inputs)[0])


def test_narrow_channel_epilogue_runs_on_full_vectors() -> None:
    """24 int32 channels fill only half an AVX-512 register: the conv's requantization runs across
    the tile's pixels on 16-lane vectors instead."""
    funcs = _scheduled_prim_funcs(grayscale_module(), VNNI)
    (conv,) = [text for name, text in funcs.items() if "conv2d" in name]
    epilogue = conv[conv.rindex("T.call_llvm_pure_intrin(") :]  # after the tensorized dot product
    assert "vpdpbusd" in conv and "T.vectorized(T.int64(16))" in epilogue


def test_pool_and_softmax_tails_are_one_kernel_each(tmp_path: Path) -> None:
    """An int8 network's average pool runs with its clamp in the window-sum kernel, and a softmax
    (max, exp sums, fixed-point reciprocal, outputs) is one kernel; outputs equal TFLite's reference."""
    from ai_edge_litert import interpreter as litert

    from edgeq.int8 import import_integer
    from edgeq.tflite_builder import Q, TFLiteBuilder

    b = TFLiteBuilder()
    x = b.input((1, 16, 16, 8), "int8", Q(0.05, -3))
    pooled = b.average_pool2d(x, (2, 2), out=Q(0.05, -3))
    logits = b.reshape(pooled, (1, 512))
    b.output(b.softmax(logits, beta=1.0))
    path = tmp_path / "tail.tflite"
    path.write_bytes(b.build())
    mod, _report = import_integer(path)

    funcs = _scheduled_prim_funcs(mod, VNNI)
    pools = [name for name in funcs if "window_sum" in name]
    assert len(pools) == 1 and "maximum" in pools[0] and not [n for n in funcs if n.startswith("fused_maximum")]
    softmax = [name for name, text in funcs.items() if "sum_of_exps" in text]
    assert len(softmax) == 1 and "reciprocal" in funcs[softmax[0]] and "max" not in funcs, sorted(funcs)

    reference = litert.Interpreter(model_path=str(path), experimental_op_resolver_type=litert.OpResolverType.BUILTIN_REF)
    reference.allocate_tensors()
    image = _int8(1, 16, 16, 8)
    reference.set_tensor(reference.get_input_details()[0]["index"], image)
    reference.invoke()
    want = reference.get_tensor(reference.get_output_details()[0]["index"])
    target = VNNI if _host_has(VNNI) else X86
    np.testing.assert_array_equal(_run(build_cpu(mod, target), [image])[0].reshape(want.shape), want)


def _conv_then_pool(path: Path, size: int, channels: int, pool: int, pool_stride: int, depthwise: bool) -> Path:
    """An int8 TFLite model: 3x3 conv or depthwise conv (SAME, RELU, per-channel scales) ->
    AVERAGE_POOL_2D (VALID)."""
    from edgeq.tflite_builder import Q, TFLiteBuilder

    b = TFLiteBuilder()
    inputs = channels if depthwise else 8
    x = b.input((1, size, size, inputs), "int8", Q(0.04, -9))
    scales = [float(s) for s in RNG.uniform(0.002, 0.01, channels)]
    weights = b.constant(_int8(1, 3, 3, channels) if depthwise else _int8(channels, 3, 3, inputs),
                         Q(scales, [0] * channels, axis=3 if depthwise else 0))
    bias = b.constant(RNG.integers(-3000, 3000, channels).astype("int32"), Q([0.04 * s for s in scales], [0] * channels))
    layer = b.depthwise_conv2d if depthwise else b.conv2d
    conv = layer(x, weights, bias, Q(0.02, -128), activation="RELU")
    b.output(b.average_pool2d(conv, pool, pool_stride, out=Q(0.02, -128)))
    path.write_bytes(b.build())
    return path


@pytest.mark.parametrize(
    "size,channels,pool,stride,depthwise,fused",
    [(12, 24, 2, 2, False, True), (9, 32, 3, 3, False, True), (12, 32, 2, 2, True, True),
     (12, 24, 3, 2, False, False), (9, 24, 2, 2, False, False)],
    ids=["2x2", "3x3", "depthwise", "overlapping", "rows-left-over"],
)
def test_a_tiling_average_pool_runs_in_the_convolutions_tiles(
    tmp_path: Path, size: int, channels: int, pool: int, stride: int, depthwise: bool, fused: bool
) -> None:
    """An average pool whose windows tile the conv's output (stride = window, nothing left over)
    joins the conv's kernel and pools each parallel tile right after its requantization: no second
    pass over the conv's output. Overlapping windows, or a last row no window reads, keep a pool
    kernel of their own. Outputs equal TFLite's reference kernels either way."""
    from ai_edge_litert import interpreter as litert

    from edgeq.int8 import import_integer

    path = _conv_then_pool(tmp_path / "conv_pool.tflite", size, channels, pool, stride, depthwise)
    mod, _report = import_integer(path)
    funcs = _scheduled_prim_funcs(mod, VNNI)
    together = [text for name, text in funcs.items() if ("conv2d" in name or "depthwise" in name) and "window_sum" in name]
    assert len(together) == int(fused), sorted(funcs)
    if fused:
        (kernel,) = together
        tiles = kernel[kernel.index("T.parallel(") :]
        assert kernel.count("T.parallel(") == 1 and "vpdpbusd" in tiles
        assert tiles.index('sblock("requantize")') < tiles.index('sblock("window_sum_update")')
    else:
        assert [name for name in funcs if name.startswith("fused_window_sum")], sorted(funcs)

    reference = litert.Interpreter(model_path=str(path), experimental_op_resolver_type=litert.OpResolverType.BUILTIN_REF)
    reference.allocate_tensors()
    image = _int8(1, size, size, channels if depthwise else 8)
    reference.set_tensor(reference.get_input_details()[0]["index"], image)
    reference.invoke()
    want = reference.get_tensor(reference.get_output_details()[0]["index"])
    for target in [X86, VNNI] if _host_has(VNNI) else [X86]:
        np.testing.assert_array_equal(_run(build_cpu(mod, target), [image])[0], want)


@pytest.mark.parametrize("size,channels", [(48, 24), (20, 16)], ids=["grayscale-96", "rgb-20"])
def test_a_float_inputs_quantize_runs_per_thread_in_the_first_convolution(
    tmp_path: Path, size: int, channels: int
) -> None:
    """A float input's QUANTIZE (a rounding division per pixel) joins the first convolution's
    kernel: each core quantizes the input rows its own tiles read into a buffer of its own, inside
    the tiles' one parallel loop (no kernel, no thread wake-up of its own). Outputs equal TFLite's
    reference kernels, on inputs that land on rounding ties too."""
    from ai_edge_litert import interpreter as litert

    from edgeq.int8 import import_integer
    from edgeq.tflite_builder import Q, TFLiteBuilder

    inputs = 1 if channels == 24 else 3
    b = TFLiteBuilder()
    x = b.input((1, 2 * size, 2 * size, inputs), "float32")
    q = b.quantize(x, Q(0.03125, -9))
    scales = [float(s) for s in RNG.uniform(0.002, 0.01, channels)]
    weights = b.constant(_int8(channels, 3, 3, inputs), Q(scales, [0] * channels))
    bias = b.constant(RNG.integers(-3000, 3000, channels).astype("int32"), Q([0.03125 * s for s in scales], [0] * channels))
    b.output(b.conv2d(q, weights, bias, Q(0.02, -128), stride=2, activation="RELU"))
    path = tmp_path / "quantize_conv.tflite"
    path.write_bytes(b.build())
    mod, _report = import_integer(path)

    funcs = _scheduled_prim_funcs(mod, VNNI)
    (kernel,) = [text for name, text in funcs.items() if "round_half_away" in name]
    assert "conv2d" in kernel and kernel.count("T.parallel(") == 1 and "T.parallel(T.int64(2))" in kernel
    per_core = kernel[kernel.index("T.parallel(") :]
    assert per_core.index('sblock("PadInput') < per_core.index("dot_conv2d")

    # multiples of half a quantization step: every other pixel a tie that rounds away from zero
    image = (RNG.integers(-300, 300, size=(1, 2 * size, 2 * size, inputs)) * (0.03125 / 2)).astype("float32")
    reference = litert.Interpreter(model_path=str(path), experimental_op_resolver_type=litert.OpResolverType.BUILTIN_REF)
    reference.allocate_tensors()
    reference.set_tensor(reference.get_input_details()[0]["index"], image)
    reference.invoke()
    want = reference.get_tensor(reference.get_output_details()[0]["index"])
    for target in [X86, VNNI] if _host_has(VNNI) else [X86]:
        np.testing.assert_array_equal(_run(build_cpu(mod, target), [image])[0], want)


def _high_multiply_module(shift: int, offset: int, scalar_multiplier: bool) -> tvm.IRModule:
    """out = int32((int64(a) * int64(m) + offset) >> shift), vectorized 16 lanes at a time."""
    from tvm import te, tirx

    a = te.placeholder((256,), "int32", name="a")
    m = te.placeholder((256,), "int32", name="m")

    def element(i):
        factor = tirx.const(1_518_500_250, "int64") if scalar_multiplier else m[i].astype("int64")
        return ((a[i].astype("int64") * factor + tirx.const(offset, "int64")) >> tirx.const(shift, "int64")).astype("int32")

    out = te.compute((256,), element, name="out")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, m, out]))
    _, inner = sch.split(sch.get_loops(sch.get_sblock("out"))[0], [None, 16])
    sch.vectorize(inner)
    return tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")})


@pytest.mark.parametrize("target", [AVX512, VNNI], ids=["avx512", "vnni"])
@pytest.mark.parametrize("shift,offset,scalar", [(31, 1 << 30, False), (31, 1 << 30, True), (1, 1, False),
                                                 (32, -7, False), (40, 1 << 39, False), (63, 0, False)])
def test_high_multiply_runs_as_even_odd_pmuldq(target: tvm.target.Target, shift: int, offset: int,
                                               scalar: bool) -> None:
    """AVX-512 builds take a requantization's 64-bit product as pmuldq on even and odd lanes, without
    widening int32 lanes to 64 bits and narrowing them back (TVM's build does both), and give the
    same bits as TVM's build on the whole int32 range."""
    from edgeq.schedules.pipeline import tir_pipeline_for

    if not _host_has(target):
        pytest.skip(f"this CPU cannot run {target.attrs['mcpu']} code")
    mod = _high_multiply_module(shift, offset, scalar)
    ours = tvm.compile(mod, target=target, tir_pipeline=tir_pipeline_for(target))
    stock = tvm.compile(mod, target=target)
    widen_or_narrow = r"\tvpmov[sz]xdq\s|\tvpmovqd\s"
    assert re.search(widen_or_narrow, _source(stock, "asm"))
    assert "vpmuldq" in _source(ours, "asm") and not re.search(widen_or_narrow, _source(ours, "asm"))
    rng = np.random.default_rng(shift)
    a = rng.integers(-(1 << 31), 1 << 31, 256, dtype=np.int64).astype(np.int32)
    m = rng.integers(-(1 << 31), 1 << 31, 256, dtype=np.int64).astype(np.int32)
    a[:4], m[:4] = [-(1 << 31), (1 << 31) - 1, -1, 0], [-(1 << 31), (1 << 31) - 1, (1 << 31) - 1, -(1 << 31)]
    results = []
    for lib in (ours, stock):
        out = tvm.runtime.tensor(np.zeros(256, np.int32))
        lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(m), out)
        results.append(out.numpy())
    np.testing.assert_array_equal(results[0], results[1])


def test_constant_adds_fold_into_one() -> None:
    """(x + c1) + c2 with integer constants becomes x + (c1 + c2), wrapping like int32 does; on VNNI
    a pointwise conv's uint8 correction and its bias are then one add."""
    from edgeq.schedules.fusion import FoldConstantAdds

    c1 = np.array([2**31 - 1, -5, 7], "int32")
    c2 = np.array([1, 5, -9], "int32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 3), "int32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            inner = bb.emit(relax.op.add(x, relax.const(c1)))
            out = bb.emit_output(relax.op.add(inner, relax.const(c2)))
        bb.emit_func_output(out)
    folded = FoldConstantAdds()(bb.get())
    assert folded["main"].script().count("R.add(") == 1
    values = np.array([[1, 2, 3], [-4, 5, 2**31 - 1]], "int32")
    with np.errstate(over="ignore"):
        want = values + c1 + c2
    np.testing.assert_array_equal(_run(tvm.compile(folded, target=X86), [values])[0], want)
    weight, bias = _int8(1, 1, 32, 48), RNG.integers(-999, 999, size=(48,)).astype("int32")

    def body(bb: relax.BlockBuilder, x: relax.Var) -> relax.Expr:
        acc = bb.emit(relax.op.nn.conv2d(x, relax.const(weight), data_layout="NHWC", kernel_layout="HWIO",
                                         out_dtype="int32"))
        return _requant(bb, bb.emit(relax.op.add(acc, relax.const(bias))), 1_400_000_000, 38)

    kernels = _scheduled_prim_funcs(_module((1, 14, 14, 32), body), VNNI)
    (conv,) = [name for name in kernels if "dot_conv2d" in name]
    assert "_add" in conv and not re.search(r"add\d*_add", conv), conv


def test_tiny_reductions_run_on_one_thread() -> None:
    """A reduction of a few thousand multiply-adds (a classifier head) stays on one thread: waking
    the pool costs more than it saves. A conv layer's kernel runs in parallel."""
    (dense,) = [text for name, text in _scheduled_prim_funcs(dense_module(), VNNI).items() if "matmul" in name]
    assert "T.parallel(" not in dense and "vpdpbusd" in dense
    # Three classes: too narrow for the dot-product tiles, scheduled as a plain reduction.
    (head,) = [text for name, text in _scheduled_prim_funcs(dense_module(3), VNNI).items() if "matmul" in name]
    assert "vpdpbusd" not in head and "T.parallel(" not in head
    conv = [text for name, text in _scheduled_prim_funcs(pointwise_module(), VNNI).items() if "conv2d" in name]
    assert conv and all("T.parallel(" in text for text in conv)
