"""Accuracy-aware fallback: the budget search, evaluation sets, float islands in the integer importer.

The search (fit_accuracy_budget) is tested on synthetic models; the whole path -- quantize with a
budget, a TFLite model with float layers, packaged through edgeq's integer importer and checked
against TFLite's reference interpreter -- on the shared rock/paper/scissors float model.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")  # edgeq.quantization reads graphs through edgeq.int8, which needs TVM

from edgeq.errors import EdgeqError, InputError  # noqa: E402
from edgeq.manifest import Preprocess, TensorSpec  # noqa: E402
from edgeq.quantization.evaluation import EvalSample, labelled_pictures, top1_accuracy  # noqa: E402
from edgeq.quantization.fallback import LayerSensitivity, fit_accuracy_budget  # noqa: E402

SPEC = TensorSpec(name="image", shape=(1, 8, 8, 3), dtype="float32", layout="NHWC")
LAYERS = [  # deliberately not in rank order
    LayerSensitivity("conv_b", "CONV_2D", 30.0, 0.03, 1000),
    LayerSensitivity("fc", "FULLY_CONNECTED", 12.0, 0.25, 10),
    LayerSensitivity("add", "ADD", 25.0, 0.06, 0),
    LayerSensitivity("conv_a", "CONV_2D", 18.0, 0.12, 3000),
]


def _synthetic(gains: dict[str, float], base: float):
    """build() returns the float layers; accuracy() adds each float layer's gain to ``base``."""
    built: list[frozenset[str]] = []

    def build(float_layers: frozenset[str]) -> frozenset[str]:
        built.append(float_layers)
        return float_layers

    def accuracy(model: frozenset[str]) -> float:
        return base + sum(gains[name] for name in model)

    return build, accuracy, built


# --- the search ----------------------------------------------------------------------------------
def test_layers_return_to_float_worst_first_until_the_budget_holds():
    build, accuracy, built = _synthetic({"fc": 2.0, "conv_a": 3.0, "add": 1.0, "conv_b": 1.0}, base=90.0)
    model, report = fit_accuracy_budget(LAYERS, build, accuracy, float_accuracy=96.0, max_drop=1.0)
    # 90 -> 92 (+fc) -> 95 (+conv_a) meets 96 - 1; add and conv_b are never tried
    assert model == {"fc", "conv_a"} and report.met
    assert built == [frozenset(), {"fc"}, {"fc", "conv_a"}]
    assert [s.float_layers for s in report.steps] == [(), ("fc",), ("fc", "conv_a")]
    assert [s.accuracy for s in report.steps] == [90.0, 92.0, 95.0]
    assert [s.name for s in report.sensitivities] == ["fc", "conv_a", "add", "conv_b"]
    assert report.int8_mac_share == pytest.approx(1 - 3010 / 4010)
    table = report.table()
    assert "fc" in table and "<- chosen" in table and table.index("conv_a") < table.index("conv_b")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["float_layers"] == ["fc", "conv_a"] and data["met"] is True


def test_a_model_within_budget_stays_fully_int8_unless_fallback_is_forced():
    build, accuracy, built = _synthetic({"fc": 0.0, "conv_a": 0.0, "add": 0.0, "conv_b": 0.0}, base=95.5)
    model, report = fit_accuracy_budget(LAYERS, build, accuracy, float_accuracy=96.0, max_drop=1.0)
    assert model == frozenset() and report.met and len(report.steps) == 1 and report.int8_mac_share == 1.0
    model, report = fit_accuracy_budget(LAYERS, build, accuracy, 96.0, 1.0, min_float_layers=2)
    assert model == {"fc", "conv_a"} and len(report.steps) == 3 and report.met


def test_an_impossible_budget_keeps_the_best_model_and_says_so():
    build, accuracy, _ = _synthetic({"fc": 4.0, "conv_a": -1.0, "add": 2.0, "conv_b": 0.0}, base=80.0)
    messages: list[str] = []
    model, report = fit_accuracy_budget(LAYERS, build, accuracy, 99.0, 0.5, progress=messages.append)
    assert not report.met and len(report.steps) == 5  # every layer tried
    # 80, 84, 83, 85, 85: the first most accurate model (fewest float layers among equals) is kept
    assert model == {"fc", "conv_a", "add"} and report.final.accuracy == 85.0
    assert "NOT met" in report.summary() and any(m.startswith("WARNING") for m in messages)
    _, capped = fit_accuracy_budget(LAYERS, build, accuracy, 99.0, 0.5, max_float_layers=1)
    assert len(capped.steps) == 2 and capped.float_layers == ("fc",) and not capped.met
    with pytest.raises(EdgeqError, match="min_float_layers"):
        fit_accuracy_budget(LAYERS, build, accuracy, 99.0, 0.5, min_float_layers=3, max_float_layers=2)


# --- evaluation sets -----------------------------------------------------------------------------
def _picture(path: Path, colour) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), colour).save(path)


def test_labelled_pictures_take_classes_from_sub_folder_names(tmp_path):
    _picture(tmp_path / "0" / "a.png", (250, 0, 0))
    _picture(tmp_path / "Cat" / "b.jpg", (0, 250, 0))
    _picture(tmp_path / "cat" / "deeper" / "c.png", (0, 0, 250))
    _picture(tmp_path / "loose.png", (9, 9, 9))
    (tmp_path / "notes.txt").write_text("not a picture")
    samples = labelled_pictures(tmp_path, SPEC, Preprocess(), labels=("dog", "cat"))
    assert [s.label for s in samples] == [0, 1, 1, None]  # sorted by path: 0/, Cat/, cat/, loose
    assert all(s.inputs["image"].shape == (1, 8, 8, 3) and s.inputs["image"].dtype == np.float32 for s in samples)
    assert samples[0].inputs["image"][0, 0, 0, 0] == pytest.approx((250 - 127.5) / 127.5)
    assert len(labelled_pictures(tmp_path, SPEC, Preprocess(), labels=("dog", "cat"), limit=2)) == 2

    def predict(inputs):  # the brightest channel of the picture's first pixel
        return inputs["image"][0, 0, 0]

    # red in 0/ and green in Cat/ are right, blue in cat/ is wrong; grey (ties -> 0) agrees with reference 0
    assert top1_accuracy(predict, samples[:3]) == pytest.approx(200 / 3)
    assert top1_accuracy(predict, samples, reference_top1=[2, 2, 2, 0]) == pytest.approx(75.0)
    with pytest.raises(InputError, match="reference_top1"):
        top1_accuracy(predict, samples)


def test_bad_evaluation_folders_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        labelled_pictures(tmp_path / "missing", SPEC, Preprocess())
    with pytest.raises(InputError, match="holds no pictures"):
        labelled_pictures(tmp_path, SPEC, Preprocess())
    _picture(tmp_path / "zebra" / "a.png", (1, 2, 3))
    with pytest.raises(InputError, match="neither a class index nor a label.*zebra|zebra.*neither"):
        labelled_pictures(tmp_path, SPEC, Preprocess(), labels=("dog", "cat"))
    (tmp_path / "zebra" / "a.png").unlink()
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(InputError, match="broken.png is not a readable picture"):
        labelled_pictures(tmp_path, SPEC, Preprocess())
    assert EvalSample({"image": np.zeros(1)}, None).label is None


# --- float islands in the integer importer ---------------------------------------------------------
def _every_float_lowering(path: Path) -> Path:
    """A float model with every op the quantizer can keep float: CONV_2D (SAME, stride 2, RELU6),
    DEPTHWISE_CONV_2D (dilated), ADD, HARD_SWISH, AVERAGE_POOL_2D (SAME), TANH, SUB (fused RELU),
    RELU6, MAX_POOL_2D, LOGISTIC, MUL, MEAN, FULLY_CONNECTED, SOFTMAX."""
    from conftest import float_weights
    from edgeq.tflite_builder import TFLiteBuilder

    rng = np.random.default_rng(11)
    b = TFLiteBuilder()

    w = float_weights(b, rng)

    t = functools.partial(b.op_output, dtype="float32")  # t(shape, op, inputs, **options)

    x = b.input((1, 12, 12, 3), "float32", name="image")
    c1 = b.conv2d(x, w(8, 3, 3, 3), w(8, scale=0.1), None, stride=2, padding="SAME", activation="RELU6")
    d = b.depthwise_conv2d(c1, w(1, 3, 3, 8), w(8, scale=0.1), None, padding="SAME", dilation=2)
    a = t((1, 6, 6, 8), "ADD", [c1, d], FusedActivationFunction=0)
    h = t((1, 6, 6, 8), "HARD_SWISH", [a])
    p = b.average_pool2d(h, 3, 1, "SAME")
    th = t((1, 6, 6, 8), "TANH", [p])
    offset = b.constant(rng.uniform(-0.5, 0.5, (1, 1, 1, 8)).astype(np.float32))
    s = t((1, 6, 6, 8), "SUB", [th, offset], FusedActivationFunction=1)
    m = b.max_pool2d(t((1, 6, 6, 8), "RELU6", [s]), 2)
    u = t((1, 3, 3, 8), "MUL", [m, t((1, 3, 3, 8), "LOGISTIC", [m])], FusedActivationFunction=0)
    mean = b.mean(u, [1, 2], None, keep_dims=False)
    logits = b.fully_connected(mean, w(5, 8), w(5, scale=0.1), None)
    b.output(t((1, 5), "SOFTMAX", [logits], Beta=1.0))
    path.write_bytes(b.build())
    return path


@pytest.mark.parametrize("half", [0, 1])
def test_float_islands_import_and_match_tflite(half, tmp_path):
    """Every other layer kept float (each op once float, once int8 across the two halves): the model
    runs in TFLite, imports through the integer importer with those ops in float, and matches
    TFLite's reference kernels. Measured: identical outputs on every input."""
    import tvm

    pytest.importorskip("ai_edge_litert.interpreter")
    from edgeq.int8 import import_integer
    from edgeq.int8.graph import read_graph
    from edgeq.quantization import QuantConfig, quantize
    from edgeq.reference import ReferenceInterpreter

    model = _every_float_lowering(tmp_path / "float.tflite")
    rng = np.random.default_rng(2)
    inputs = [rng.normal(0, 1, (1, 12, 12, 3)).astype(np.float32) for _ in range(24)]
    full = quantize(model, inputs[:16], QuantConfig(samples=16), tmp_path / "int8.tflite")
    candidates = [layer for layer in full.layers if layer.op != "MAX_POOL_2D"]
    chosen = {layer.tensor: layer.op for layer in candidates[half::2]}
    report = quantize(model, inputs[:16], QuantConfig(samples=16, float_layers=chosen), tmp_path / "mixed.tflite")
    assert {layer.tensor for layer in report.layers if layer.float} >= set(chosen)
    graph = read_graph(tmp_path / "mixed.tflite")
    by_name = {graph.tensors[op.outputs[0]].name: op for op in graph.operators}
    for name, op_name in chosen.items():
        assert by_name[name].name == op_name and graph.tensors[by_name[name].outputs[0]].dtype == "float32"
    mod, integer = import_integer(tmp_path / "mixed.tflite")
    kept = [name for name, reason in integer.float_ops if "kept float on request" in reason]
    followers = list(kept)  # besides the chosen layers: the MAX_POOL_2D after a float RELU6 stays float
    for op_name in chosen.values():
        followers.remove(op_name)
    assert followers == (["MAX_POOL_2D"] if "RELU6" in chosen.values() else [])
    assert 0 < integer.integer_mac_fraction < 1 and integer.ops_integer >= len(candidates) - len(chosen)
    target = tvm.target.Target({"kind": "llvm"})
    vm = tvm.runtime.vm.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    reference = ReferenceInterpreter(tmp_path / "mixed.tflite")
    got = np.concatenate([vm["main"](tvm.runtime.tensor(x))[0].numpy() for x in inputs[16:]])
    want = np.concatenate([reference.run(x)[0] for x in inputs[16:]])
    print(f"\nhalf {half}: {np.mean(got == want):.2%} identical, max diff {np.abs(got - want).max():.3g}")
    assert np.mean(got == want) >= 0.999 and np.abs(got - want).max() <= 1 / 256  # at most one int8 softmax step


# --- end to end on the shared rock/paper/scissors float model --------------------------------------
RPS_PREPROCESS = Preprocess(color="grey", standardize=True)


@pytest.fixture(scope="module")
def rps_mixed(tmp_path_factory):
    """mltk_rps96 quantized with a forced fallback of two layers (any accuracy is within a 100-point
    budget, so the search stops at exactly two), evaluated on unlabelled pictures."""
    pytest.importorskip("ai_edge_litert.interpreter")
    from conftest import shared_path

    from edgeq.quantization import QuantConfig, picture_calibration, quantize

    model = shared_path("models", "tflite", "mltk_rps96_float32.tflite")
    calibration = picture_calibration(shared_path("data", "imagenet-samples"), model, RPS_PREPROCESS)
    spec = calibration.spec
    evaluation = labelled_pictures(shared_path("data", "cifar10-samples"), spec, RPS_PREPROCESS)
    output = tmp_path_factory.mktemp("rps_mixed") / "mixed.tflite"
    config = QuantConfig(samples=20, max_accuracy_drop=100.0, min_float_layers=2)
    report = quantize(model, calibration, config, output, evaluation=evaluation)
    return model, output, report


def test_forced_fallback_writes_the_chosen_layers_in_float(rps_mixed):
    from edgeq.int8.graph import read_graph
    from edgeq.reference import ReferenceInterpreter

    model, mixed, report = rps_mixed
    fallback = report.fallback
    print("\n" + report.table())
    assert fallback.metric == "top-1 agreement with the float model on 20 pictures" and fallback.samples == 20
    assert fallback.float_accuracy == 100.0 and fallback.met
    assert [len(step.float_layers) for step in fallback.steps] == [0, 1, 2]
    snrs = [layer.snr_db for layer in fallback.sensitivities]
    assert snrs == sorted(snrs) and len(snrs) == 7  # 3 conv, 2 average pools, FC, softmax; no RESHAPE
    assert fallback.float_layers == tuple(layer.name for layer in fallback.sensitivities[:2])
    graph = read_graph(mixed)
    ops = {graph.tensors[op.outputs[0]].name: op for op in graph.operators}
    for name in fallback.float_layers:
        op = ops[name]
        assert all(graph.tensors[i].dtype == "float32" for i in op.inputs + op.outputs if i >= 0), name
    int8_layers = [layer for layer in fallback.sensitivities[2:] if layer.op in ("CONV_2D", "FULLY_CONNECTED")]
    assert int8_layers and all(graph.tensors[ops[layer.name].inputs[1]].dtype == "int8" for layer in int8_layers)
    assert {layer.tensor for layer in report.layers if layer.float} >= set(fallback.float_layers)
    float_macs = sum(layer.macs for layer in fallback.sensitivities if layer.name in fallback.float_layers)
    total_macs = sum(layer.macs for layer in fallback.sensitivities)
    assert fallback.int8_mac_share == pytest.approx(1 - float_macs / total_macs)
    assert report.to_dict()["fallback"]["float_layers"] == list(fallback.float_layers)
    ReferenceInterpreter(mixed).run(np.zeros((1, 96, 96, 1), np.float32))  # TFLite runs the mixed model


def test_mixed_model_packages_through_the_integer_importer_and_matches_tflite(rps_mixed, tmp_path):
    """Float islands in the integer importer: the integer ops stay bit-exact, float ops follow TFLite's
    float kernels. Measured: all outputs identical to the reference interpreter on the 61 shared
    pictures; a float value on a rounding boundary could change one int8 step after a float island."""
    import edgeq
    from conftest import shared_path
    from edgeq.reference import ReferenceInterpreter

    _, mixed, report = rps_mixed
    options = edgeq.PackageOptions(
        device="x86_64", preprocess={"standardize": True, "color": "grey"},
        compile=edgeq.CompileOptions(default_schedules=False),
    )
    result = edgeq.package(mixed, tmp_path / "mixed.edgeq", options)
    compiled = result.manifest.compile_report
    assert compiled["importer"] == "edgeq-integer", compiled
    integer = compiled["integer"]
    budget_ops = [(name, reason) for name, reason in integer["float_ops"] if "kept float by the accuracy budget" in reason]
    assert len(budget_ops) == 2 and all(any(layer in reason for layer in report.fallback.float_layers)
                                        for _, reason in budget_ops)
    share = integer["macs_integer"] / integer["macs_total"]
    assert share == pytest.approx(report.fallback.int8_mac_share) and share < 1
    assert "kept float by the accuracy budget" in compiled["summary"]
    predictor, reference = edgeq.load(result.path), ReferenceInterpreter(mixed)
    pictures = sorted(p for p in shared_path("data").rglob("*") if p.suffix in (".png", ".jpg"))
    identical = 0
    for picture in pictures:
        inputs = predictor.preprocess(picture)
        got, want = predictor.run(inputs)[0], reference.run(inputs)[0]
        assert got.argmax() == want.argmax(), picture.name
        identical += bool(np.array_equal(got, want))
    print(f"\n{identical} of {len(pictures)} pictures give identical outputs")
    assert identical >= 0.99 * len(pictures)


def test_cli_quantize_auto_holds_out_calibration_pictures(tmp_path, capsys):
    """--quantize auto: a 1-point budget scored by agreement with the float model on every 4th picture."""
    pytest.importorskip("ai_edge_litert.interpreter")
    from conftest import shared_path
    from edgeq.cli import main as cli_main

    model = shared_path("models", "tflite", "mltk_rps96_float32.tflite")
    args = ["package", str(model), "--device", "x86_64", "--quantize", "auto", "--samples", "12",
            "--calibration", str(shared_path("data", "imagenet-samples")), "--standardize", "--color", "grey",
            "--no-schedules", "--report", "json", "-o", str(tmp_path / "auto.edgeq")]
    assert cli_main(args) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out[: captured.out.rindex("}") + 1])
    assert report["importer"] == "edgeq-integer"
    quantization = report["quantization"]
    fallback = quantization["fallback"]
    assert quantization["samples"] == 12  # 16 pictures read, every 4th held out
    assert fallback["metric"] == "top-1 agreement with the float model on 4 pictures" and fallback["samples"] == 4
    assert fallback["max_drop"] == 1.0 and fallback["met"] is (fallback["final_accuracy"] >= 99.0)
    assert fallback["steps"][0]["float_layers"] == [] and len(fallback["sensitivities"]) == 7
    assert "accuracy budget: lose at most 1 pt" in captured.err and "rank op" in captured.err


def test_cli_accuracy_budget_flags_are_checked(tmp_path, capsys):
    from conftest import shared_path
    from edgeq.cli import main as cli_main

    model = str(shared_path("models", "tflite", "mltk_rps96_float32.tflite"))
    pictures = str(shared_path("data", "imagenet-samples"))
    assert cli_main(["package", model, "--max-accuracy-drop", "1"]) == 1
    assert "--max-accuracy-drop is only used with --quantize int8 or --quantize auto" in capsys.readouterr().err
    assert cli_main(["package", model, "--quantize", "int8", "--calibration", pictures, "--eval", pictures]) == 1
    assert "--max-accuracy-drop" in capsys.readouterr().err
    assert cli_main(["package", model, "--quantize", "auto", "--calibration", pictures, "--eval", str(tmp_path),
                     "-o", str(tmp_path / "x.edgeq")]) == 1
    assert "holds no pictures" in capsys.readouterr().err
    assert cli_main(["package", model, "--quantize", "auto", "--max-accuracy-drop", "-3", "--calibration", pictures]) == 1
    assert "0..100" in capsys.readouterr().err


def test_budget_needs_a_classifier_and_an_evaluation_set_needs_a_budget(tmp_path):
    pytest.importorskip("ai_edge_litert.interpreter")
    from edgeq.errors import UnsupportedModelError
    from edgeq.quantization import QuantConfig, quantize
    from edgeq.tflite_builder import TFLiteBuilder

    b = TFLiteBuilder()
    x = b.input((1, 4, 4, 2), "float32")
    y = b.tensor((1, 4, 4, 2), "float32")
    b.op("RELU", [x], [y])
    b.output(y)
    (tmp_path / "map.tflite").write_bytes(b.build())
    data = [np.ones((1, 4, 4, 2), np.float32)] * 8
    with pytest.raises(UnsupportedModelError, match="top-1 classification"):
        quantize(tmp_path / "map.tflite", data, QuantConfig(max_accuracy_drop=1.0), tmp_path / "q.tflite")
    with pytest.raises(EdgeqError, match="only used with an accuracy budget"):
        quantize(tmp_path / "map.tflite", data, QuantConfig(), tmp_path / "q.tflite", evaluation=[])
    with pytest.raises(EdgeqError, match="float_layers names no op output"):
        quantize(tmp_path / "map.tflite", data, QuantConfig(float_layers={"nope"}), tmp_path / "q.tflite")
