"""--quantize fp16: float ops downcast with TVM's ToMixedPrecision, boundary dtypes kept.

fp16 bundles must agree with the fp32 bundles of the shared float models: the same top-1 on
every fitting picture (rps96) and the same detections (face detector); a quantized model asked
for fp16 goes through TVM's stock dequantize -> float -> quantize import with fp16 float ops.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import edgeq  # noqa: E402
from bundles import PREPROCESS, pictures_for  # noqa: E402
from conftest import shared_path  # noqa: E402
from edgeq.cli import main as cli_main  # noqa: E402
from edgeq.compiler import import_stock  # noqa: E402
from edgeq.detection import iou  # noqa: E402
from edgeq.errors import EdgeqError  # noqa: E402
from edgeq.fp16 import _cast_outputs, downcast_fp16  # noqa: E402
from edgeq.tflite_model import read_tflite  # noqa: E402
from test_detection import two_faces  # noqa: E402

from tvm import relax  # noqa: E402

RPS = "mltk_rps96_float32.tflite"
FACES = "mediapipe_face_detection_short_range_float.tflite"
RESNET = "mlperf_tiny_resnet_cifar10_int8.tflite"
# Measured on x86_64 over the 40 rps96 pictures: max |fp16 - fp32| of the softmax output 9.5e-3
# (fp16 accumulation; ToMixedPrecision(out_dtype="float32") would give 1.5e-3).
RPS_TOLERANCE = 2e-2


def _model(name: str) -> Path:
    return shared_path("models", "tflite", name)


def _package(name: str, out: Path, precision: str, **options) -> edgeq.PackageResult:
    compile_options = edgeq.CompileOptions(precision=precision, **options)
    return edgeq.package(_model(name), out, edgeq.PackageOptions(
        device="x86_64", preprocess=PREPROCESS.get(name, {}), compile=compile_options))


# --- the Relax pass ---------------------------------------------------------------------------------
def _calls(mod) -> list[tuple[str, list[str | None], str | None]]:
    """(op name, argument dtypes, result dtype) of every call bound in ``main``."""
    calls = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
                args = [getattr(a.ty, "dtype", None) for a in value.args]
                calls.append((value.op.name, args, getattr(binding.var.ty, "dtype", None)))
    return calls


def _signature(mod):
    main = mod["main"]
    return [p.ty.dtype for p in main.params], str(main.ret_ty)


def test_downcast_makes_fp16_convs_and_keeps_the_signature():
    mod = import_stock(read_tflite(_model(RPS)))
    mod16 = downcast_fp16(mod)
    convs = [c for c in _calls(mod16) if c[0] == "relax.nn.conv2d"]
    assert len(convs) == 3 and all(c[1] == ["float16", "float16"] and c[2] == "float16" for c in convs)
    assert _signature(mod16) == _signature(mod)  # float32 in, float32 out
    casts = [c for c in _calls(mod16) if c[0] == "relax.astype"]
    assert len(casts) == 2  # the input and the output only: weights were folded to fp16 constants


def test_downcast_of_a_stock_quantized_import_keeps_quantize_and_dequantize():
    mod = import_stock(read_tflite(_model(RESNET)))
    calls = _calls(downcast_fp16(mod))
    convs = [c for c in calls if c[0] == "relax.nn.conv2d"]
    assert convs and all(c[2] == "float16" for c in convs)
    assert all(c[2] == "float32" for c in calls if c[0] == "relax.dequantize")
    assert all(c[1][0] == "float32" and c[2] == "int8" for c in calls if c[0] == "relax.quantize")
    assert _signature(downcast_fp16(mod)) == _signature(mod)  # int8 in, int8 out


def test_outputs_cast_back_when_the_pass_changes_them():
    x = relax.Var("x", relax.TensorType((2, 3), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.astype(x, "float16"))
            out = bb.emit_output(relax.Tuple([y, x]))
        bb.emit_func_output(out)
    func = bb.get()["main"]
    fixed = _cast_outputs(func, relax.TupleType([relax.TensorType((2, 3), "float32")] * 2))
    mod = relax.transform.Normalize()(tvm.IRModule({"main": fixed}))
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    a, b = vm["main"](tvm.runtime.tensor(np.ones((2, 3), np.float32)))
    assert a.numpy().dtype == b.numpy().dtype == np.float32


def test_options_are_checked(tmp_path, capsys):
    with pytest.raises(EdgeqError, match="precision"):
        edgeq.CompileOptions(precision="bf16")
    options = edgeq.PackageOptions(compile=edgeq.CompileOptions(precision="fp16"),
                                   quantize=edgeq.QuantConfig(), calibration=tmp_path)
    with pytest.raises(EdgeqError, match="exclude"):
        edgeq.package(_model(RPS), tmp_path / "x.edgeq", options)
    assert cli_main(["package", str(_model(RPS)), "--quantize", "fp16", "--calibration", str(tmp_path)]) == 1
    assert "fp16 needs no calibration" in capsys.readouterr().err


# --- rock/paper/scissors: top-1 on every picture ------------------------------------------------------
@pytest.fixture(scope="module")
def rps(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rps")
    fp32 = _package(RPS, folder / "fp32.edgeq", "native")
    fp16 = _package(RPS, folder / "fp16.edgeq", "fp16")
    return edgeq.load(fp32.path), edgeq.load(fp16.path), fp16.manifest


def test_rps_fp16_bundle_agrees_with_fp32(rps):
    fp32, fp16, manifest = rps
    assert manifest.compile_report["precision"] == "fp16"
    assert [(s.dtype, s.shape) for s in manifest.inputs + manifest.outputs] == \
        [(s.dtype, s.shape) for s in fp32.manifest.inputs + fp32.manifest.outputs]
    pictures = pictures_for(RPS)
    assert len(pictures) == 40
    worst = 0.0
    for picture in pictures:
        inputs = fp32.preprocess(picture)
        want, got = fp32.run(inputs)[0], fp16.run(inputs)[0]
        assert got.dtype == np.float32 and got.shape == want.shape
        assert got.argmax() == want.argmax(), picture.name
        worst = max(worst, float(np.abs(got - want).max()))
    print(f"\nrps96 fp16 vs fp32: max |diff| {worst:.2e} over {len(pictures)} pictures")
    assert worst <= RPS_TOLERANCE, worst


# --- face detector: the same detections -------------------------------------------------------------
@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faces")
    fp32 = _package(FACES, folder / "fp32.edgeq", "native", default_schedules=False)
    fp16 = _package(FACES, folder / "fp16.edgeq", "fp16")
    return edgeq.load(fp32.path), edgeq.load(fp16.path)


def _face_pictures():
    faces = [p for p in pictures_for(FACES) if "imagenet" not in p.name]  # cameraman.png
    return [*faces, two_faces(0.4, 1.0, (512, 256))[0], *(p for p in pictures_for(FACES) if p not in faces)]


def test_face_fp16_bundle_finds_the_same_faces(faces):
    fp32, fp16 = faces
    counts, worst = [], 0.0
    for picture in _face_pictures():
        want, got = fp32.predict(picture), fp16.predict(picture)
        assert len(got) == len(want), getattr(picture, "name", "two faces")
        for detection in want:
            boxes = np.asarray([d.box for d in got], np.float64)
            assert iou(np.asarray(detection.box, np.float64), boxes).max() >= 0.9
            worst = max(worst, abs(detection.score - max(d.score for d in got)))
        counts.append(len(want))
    print(f"\nfaces fp16 vs fp32: {sum(counts)} detections, max score difference {worst:.2e}")
    assert counts[:2] == [1, 2]  # cameraman's face, then the two pasted ones


# --- a quantized model asked for fp16 through the CLI -------------------------------------------------
def test_cli_fp16_on_a_quantized_model_predicts_like_tflite(tmp_path, capsys):
    from edgeq.reference import ReferenceInterpreter

    out = tmp_path / "resnet.edgeq"
    assert cli_main(["package", str(_model(RESNET)), "--quantize", "fp16", "-o", str(out)]) == 0
    assert "fp16" in capsys.readouterr().err
    predictor = edgeq.load(out)
    report = predictor.manifest.compile_report
    assert report["precision"] == "fp16" and report["importer"] == "tvm-stock"
    picture = pictures_for(RESNET)[0]
    inputs = predictor.preprocess(picture)
    got, want = predictor.run(inputs)[0], ReferenceInterpreter(_model(RESNET)).run(inputs)[0]
    assert got.dtype == want.dtype == np.int8 and got.argmax() == want.argmax()
