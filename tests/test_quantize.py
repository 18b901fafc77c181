"""edgeq.quantize: calibrate a float TFLite model and write its fully-quantized int8 twin.

The twin must run in TFLite's reference interpreter, agree with its float model at least as well as
the vendor's own int8 twin (mltk_rps96) on held-out pictures, and package through edgeq's integer
importer bit-exactly with the reference kernels.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
pytest.importorskip("ai_edge_litert.interpreter")

import edgeq  # noqa: E402
from conftest import float_weights, shared_path  # noqa: E402
from edgeq.cli import main as cli_main  # noqa: E402
from edgeq.errors import EdgeqError, InputError, UnsupportedModelError  # noqa: E402
from edgeq.int8 import import_integer  # noqa: E402
from edgeq.int8.graph import read_graph  # noqa: E402
from edgeq.manifest import Preprocess  # noqa: E402
from edgeq.preprocess import picture_to_tensor  # noqa: E402
from edgeq.quantization import QuantConfig, picture_calibration, quantize  # noqa: E402
from edgeq.quantization.calibrate import entropy_threshold, kl_divergence_curve  # noqa: E402
from edgeq.quantization.config import as_feeds  # noqa: E402
from edgeq.reference import ReferenceInterpreter  # noqa: E402
from edgeq.tflite_builder import TFLiteBuilder  # noqa: E402
from edgeq.tflite_model import read_tflite  # noqa: E402

RPS_PREPROCESS = Preprocess(color="grey", standardize=True)
FOLDERS = ("mnist-samples", "cifar10-samples", "imagenet-samples")


# --- configuration and the calibration protocol ----------------------------------------------------
def test_config_is_validated():
    assert QuantConfig(method="entropy").method == "entropy"
    with pytest.raises(EdgeqError, match="minmax, percentile, entropy"):
        QuantConfig(method="kl")
    with pytest.raises(EdgeqError, match="samples"):
        QuantConfig(samples=0)
    with pytest.raises(EdgeqError, match="dtype"):
        QuantConfig(activation_dtype="int4")


def test_samples_may_be_dicts_arrays_or_lists_with_or_without_batch():
    spec = edgeq.manifest.TensorSpec(name="x", shape=(1, 4, 4, 1), dtype="float32", layout="NHWC")
    one = np.zeros((4, 4, 1), np.float32)
    for sample in ({"x": one}, one, [one], one[None], np.zeros((3, 4, 4, 1))):
        feeds = list(as_feeds(sample, [spec]))
        assert all(f[0].shape == (1, 4, 4, 1) and f[0].dtype == np.float32 for f in feeds)
    assert len(list(as_feeds(np.zeros((3, 4, 4, 1)), [spec]))) == 3
    with pytest.raises(InputError, match="shape"):
        list(as_feeds(np.zeros((5, 5)), [spec]))


def test_entropy_threshold_clips_heavy_outliers():
    """TensorRT's KL search on |x|: a normal bulk plus a few huge outliers is clipped between the two."""
    rng = np.random.default_rng(3)
    values = np.abs(np.concatenate([rng.normal(0, 1, 200_000), rng.uniform(-100, 100, 40), [100.0]]))
    histogram, _ = np.histogram(values, 2048, (0, values.max()))
    threshold = entropy_threshold(histogram, float(values.max()))
    bulk = float(np.percentile(values, 99.9))  # 3.3
    print(f"\nentropy threshold {threshold:.2f}; bulk (99.9%) {bulk:.2f}, max {values.max():.1f}")
    assert 1.5 * bulk < threshold < values.max() / 5
    candidates, divergences = kl_divergence_curve(histogram, 128, step=16)
    assert candidates[0] == 128 and candidates[-1] == 2048 and np.isfinite(divergences).all()
    # without outliers nothing is worth clipping much: the threshold stays near the top of the bulk
    clean, _ = np.histogram(values[:200_000], 2048, (0, values[:200_000].max()))
    assert entropy_threshold(clean, float(values[:200_000].max())) > 0.6 * values[:200_000].max()


# --- a generated float model with the MobileNet op set ----------------------------------------------
def _mobilenet_like(path: Path) -> Path:
    """PAD, CONV_2D(RELU6), DEPTHWISE_CONV_2D(RELU), ADD, HARD_SWISH, MAX_POOL_2D, LOGISTIC,
    CONCATENATION, MUL by a constant, MEAN, RESHAPE, FULLY_CONNECTED, SOFTMAX, all float32."""
    rng = np.random.default_rng(7)
    b = TFLiteBuilder()

    w = float_weights(b, rng)

    t = functools.partial(b.op_output, dtype="float32")  # t(shape, op, inputs, **options)

    x = b.input((1, 16, 16, 3), "float32", name="image")
    x = b.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
    c1 = b.conv2d(x, w(8, 3, 3, 3), w(8, scale=0.1), None, stride=2, padding="VALID", activation="RELU6")
    dw = b.depthwise_conv2d(c1, w(1, 3, 3, 8), w(8, scale=0.1), None, activation="RELU")
    pw = b.conv2d(dw, w(8, 1, 1, 8), w(8, scale=0.1), None)
    s = t((1, 8, 8, 8), "ADD", [dw, pw], FusedActivationFunction=0)
    s = t((1, 8, 8, 8), "HARD_SWISH", [s])
    p = b.max_pool2d(s, 2)
    g = t((1, 4, 4, 4), "LOGISTIC", [b.conv2d(p, w(4, 1, 1, 8), w(4, scale=0.1), None)])
    cat = b.concatenation([p, g], axis=3)
    m = t((1, 4, 4, 12), "MUL", [cat, b.constant(rng.uniform(0.5, 2, (1, 1, 1, 12)).astype(np.float32))],
          FusedActivationFunction=0)
    mean = b.mean(m, [1, 2], None, keep_dims=True)
    flat = b.reshape(mean, (1, 12))
    logits = b.fully_connected(flat, w(5, 12), w(5, scale=0.1), None)
    b.output(t((1, 5), "SOFTMAX", [logits], Beta=1.0))
    path.write_bytes(b.build())
    return path


@pytest.fixture(scope="module")
def mobilenet_like(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mobilenet_like")
    model = _mobilenet_like(folder / "float.tflite")
    rng = np.random.default_rng(1)
    calibration = [{"image": rng.normal(0, 1, (1, 16, 16, 3)).astype(np.float32)} for _ in range(40)]
    report = quantize(model, calibration, QuantConfig(samples=32), folder / "int8.tflite")
    return model, folder / "int8.tflite", report, calibration[32:]


def test_mobilenet_op_set_is_fully_quantized(mobilenet_like):
    model, quantized, report, _ = mobilenet_like
    float_ops = read_tflite(model).ops
    ops = read_tflite(quantized).ops
    assert ops[0] == "QUANTIZE" and ops[-1] == "DEQUANTIZE"
    assert [op for op in ops if op not in ("QUANTIZE", "DEQUANTIZE")] == list(float_ops)
    graph = read_graph(quantized)
    for op in graph.operators[1:-1]:
        assert all(graph.tensors[i].dtype == "int8" for i in op.outputs), op.name
        if op.name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            weights, bias = graph.tensors[op.inputs[1]], graph.tensors[op.inputs[2]] if op.inputs[2] >= 0 else None
            axis = 3 if op.name == "DEPTHWISE_CONV_2D" else 0
            assert weights.dtype == "int8" and not weights.quant.zero_point.any()
            assert weights.quant.scale.size == weights.shape[axis] and weights.quant.axis == axis
            assert bias is None or bias.dtype == "int32"
        if op.name in ("SOFTMAX", "LOGISTIC"):
            out = graph.tensors[op.outputs[0]].quant
            assert (float(out.s), out.zp) == (1 / 256, -128)
    assert report.samples == 32 and len(report.layers) == len(float_ops)
    assert {layer.op for layer in report.layers} == set(float_ops)
    assert report.output_snr_db > 20, report.table()
    assert "SNR" in report.summary() and report.to_dict()["layers"][0]["op"] == "PAD"


def test_quantized_model_imports_bit_exactly(mobilenet_like):
    """The written model goes through edgeq's integer importer unchanged and matches BUILTIN_REF."""
    _, quantized, _, held_out = mobilenet_like
    mod, report = import_integer(quantized)
    assert report.macs_integer == report.macs_total > 0
    vm = tvm.runtime.vm.VirtualMachine(tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    reference = ReferenceInterpreter(quantized)
    for sample in held_out:
        got = vm["main"](tvm.runtime.tensor(sample["image"]))[0].numpy()
        np.testing.assert_array_equal(got, reference.run(sample["image"])[0])


def test_unsupported_and_already_quantized_models_are_refused(tmp_path):
    b = TFLiteBuilder()
    x = b.input((1, 4), "float32")
    y = b.tensor((1, 4), "float32")
    b.op("EXP", [x], [y])
    b.output(y)
    (tmp_path / "exp.tflite").write_bytes(b.build())
    with pytest.raises(UnsupportedModelError, match="EXP"):
        quantize(tmp_path / "exp.tflite", [np.zeros((1, 4), np.float32)], QuantConfig(), tmp_path / "q.tflite")
    int8 = shared_path("models", "tflite", "mltk_rps96_int8.tflite")
    with pytest.raises(UnsupportedModelError, match="already quantized"):
        quantize(int8, [np.zeros((1, 96, 96, 1), np.float32)], QuantConfig(), tmp_path / "q.tflite")


# --- the shared rock/paper/scissors model against the vendor's own int8 twin ----------------------
def _pictures() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in shared_path("data", folder).iterdir())


def _variants(path: Path):
    from PIL import Image, ImageOps

    picture = Image.open(path).convert("RGB")
    w, h = picture.size
    return [picture, ImageOps.mirror(picture), picture.rotate(90), picture.crop((w // 8, h // 8, w - w // 8, h - h // 8))]


@pytest.fixture(scope="module")
def rps(tmp_path_factory):
    """Calibration folder (100 pictures: even-numbered shared pictures and 3 variants of each) and
    held-out tensors (odd-numbered pictures and their mirror images)."""
    model = shared_path("models", "tflite", "mltk_rps96_float32.tflite")
    folder = tmp_path_factory.mktemp("rps_calibration")
    spec = read_tflite(model).inputs[0]
    held_out = []
    for n, path in enumerate(_pictures()):
        variants = _variants(path)
        if n % 2 == 0:
            for k, picture in enumerate(variants):
                picture.save(folder / f"{path.stem}_{k}.png")
        else:
            held_out += [picture_to_tensor(np.asarray(p), spec, RPS_PREPROCESS) for p in variants[:2]]
    return model, folder, held_out


def _agreement(model: Path, reference: np.ndarray, inputs) -> tuple[float, float]:
    interpreter = ReferenceInterpreter(model)
    outputs = np.concatenate([interpreter.run(x)[0] for x in inputs])
    return float((outputs.argmax(1) == reference.argmax(1)).mean()), float(np.abs(outputs - reference).mean())


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_rps96_agrees_with_float_at_least_as_well_as_vendor_int8(rps, method, tmp_path):
    model, folder, held_out = rps
    calibration = picture_calibration(folder, model, RPS_PREPROCESS)
    assert len(calibration) >= 100
    report = quantize(model, calibration, QuantConfig(method=method, samples=100), tmp_path / "q.tflite")
    assert report.samples == 100
    floats = ReferenceInterpreter(model)
    reference = np.concatenate([floats.run(x)[0] for x in held_out])
    vendor_top1, vendor_mad = _agreement(shared_path("models", "tflite", "mltk_rps96_int8.tflite"), reference, held_out)
    top1, mad = _agreement(tmp_path / "q.tflite", reference, held_out)
    print(f"\n{method}: ours top-1 {top1:.3f}, mean |diff| {mad:.4f}; vendor {vendor_top1:.3f}, {vendor_mad:.4f}")
    assert top1 >= vendor_top1 and mad <= vendor_mad, report.table()


def test_rps96_package_quantize_matches_reference_bit_exactly(rps, tmp_path):
    model, folder, held_out = rps
    config = QuantConfig(method="percentile", samples=100)
    options = edgeq.PackageOptions(
        device="x86_64", preprocess={"standardize": True, "color": "grey"}, quantize=config, calibration=folder,
        compile=edgeq.CompileOptions(default_schedules=False),
    )
    messages: list[str] = []
    result = edgeq.package(model, tmp_path / "rps.edgeq", options, progress=messages.append)
    assert any(m.startswith("calibrating") for m in messages)
    manifest = result.manifest
    assert manifest.source.name == model.name and manifest.compile_report["importer"] == "edgeq-integer"
    assert manifest.compile_report["quantization"]["samples"] == 100
    # quantize() is deterministic: the same calibration writes the model the bundle was built from.
    quantize(model, picture_calibration(folder, model, RPS_PREPROCESS), config, tmp_path / "q.tflite")
    reference = ReferenceInterpreter(tmp_path / "q.tflite")
    predictor = edgeq.load(result.path)
    pictures = _pictures()[1::2]
    for picture in pictures:
        inputs = predictor.preprocess(picture)
        np.testing.assert_array_equal(predictor.run(inputs)[0], reference.run(inputs)[0], err_msg=picture.name)
    for x in held_out:
        np.testing.assert_array_equal(predictor.run([x])[0], reference.run(x)[0])


def test_cli_quantize_flags_are_checked(capsys):
    model = shared_path("models", "tflite", "mltk_rps96_float32.tflite")
    assert cli_main(["package", str(model), "--quantize", "int8"]) == 1
    assert "--calibration" in capsys.readouterr().err
    assert cli_main(["package", str(model), "--calibration", "."]) == 1
    assert "--quantize" in capsys.readouterr().err
