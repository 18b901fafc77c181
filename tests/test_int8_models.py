"""The shared quantized models through edgeq.int8 against TFLite's reference kernels, on real pictures.

Each model is imported and compiled once per module. The reference is ai-edge-litert with
OpResolverType.BUILTIN_REF (TFLite's reference kernels); both sides get the same input tensor.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from conftest import shared_path

tvm = pytest.importorskip("tvm")
litert = pytest.importorskip("ai_edge_litert.interpreter")
Image = pytest.importorskip("PIL.Image")

from edgeq.int8 import import_integer  # noqa: E402
from edgeq.int8.graph import read_graph  # noqa: E402


def _rgb(path: Path, size: int) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR))


def efficientnet_input(path: Path) -> np.ndarray:
    return _rgb(path, 224)[None].astype(np.uint8)


def resnet_input(path: Path) -> np.ndarray:
    return (_rgb(path, 32).astype(np.int16) - 128).astype(np.int8)[None]


def vww_input(path: Path) -> np.ndarray:
    return _rgb(path, 96).astype(np.float32)[None]


def rps_input(path: Path) -> np.ndarray:
    grey = np.asarray(Image.open(path).convert("L").resize((96, 96), Image.BILINEAR), np.float32)
    return ((grey - grey.mean()) / max(float(grey.std()), 1e-6))[None, :, :, None].astype(np.float32)


@dataclass(frozen=True)
class ModelCase:
    model: str
    pictures: tuple[str, ...]  # folders under shared/data
    make_input: Callable[[Path], np.ndarray]


CASES = {
    "efficientnet": ModelCase("efficientnet_lite0_uint8.tflite", ("imagenet-samples",), efficientnet_input),
    "resnet": ModelCase("mlperf_tiny_resnet_cifar10_int8.tflite", ("cifar10-samples",), resnet_input),
    "vww": ModelCase("mlperf_tiny_vww_int8.tflite", ("imagenet-samples",), vww_input),
    "rps": ModelCase("mltk_rps96_int8.tflite", ("mnist-samples", "cifar10-samples"), rps_input),
}


@dataclass
class Compiled:
    path: Path
    module: tvm.IRModule
    report: object
    vm: object


@pytest.fixture(scope="module", params=sorted(CASES))
def compiled(request) -> tuple[ModelCase, Compiled]:
    case = CASES[request.param]
    path = shared_path("models", "tflite", case.model)
    module, report = import_integer(path)
    executable = tvm.compile(module, target=tvm.target.Target({"kind": "llvm"}))
    return case, Compiled(path, module, report, tvm.runtime.vm.VirtualMachine(executable, tvm.cpu()))


def _pictures(case: ModelCase) -> list[Path]:
    files = []
    for folder in case.pictures:
        files += sorted(p for p in shared_path("data", folder).iterdir() if p.suffix in (".png", ".jpg"))
    return files


def _output_step(path: Path) -> float:
    """One quantization step of the first output: 1 for 8-bit outputs, the DEQUANTIZE input scale for float."""
    graph = read_graph(path)
    output = graph.outputs[0]
    if graph.tensors[output].dtype != "float32":
        return 1.0
    producer = next(op for op in graph.operators if output in op.outputs)
    assert producer.name == "DEQUANTIZE"
    return float(graph.tensors[producer.inputs[0]].quant.s)


def test_outputs_match_reference_kernels(compiled):
    case, c = compiled
    interpreter = litert.Interpreter(model_path=str(c.path), experimental_op_resolver_type=litert.OpResolverType.BUILTIN_REF)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    step = _output_step(c.path)
    equal = total = 0
    worst = 0.0
    pictures = _pictures(case)
    assert pictures
    for picture in pictures:
        x = case.make_input(picture)
        assert x.shape == tuple(inp["shape"]) and x.dtype == inp["dtype"]
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        expected = interpreter.get_tensor(out["index"])
        actual = c.vm["main"](tvm.runtime.tensor(x))[0].numpy()
        assert actual.shape == expected.shape and actual.dtype == expected.dtype
        diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
        steps = diff / step
        worst = max(worst, float(steps.max()))
        equal += int((diff == 0).sum())
        total += diff.size
        assert int(actual.argmax()) == int(expected.argmax()), f"top-1 differs on {picture.name}"
    identical = equal / total
    print(f"{case.model}: {len(pictures)} pictures, {100 * identical:.3f}% identical, max {worst:g} steps")
    assert identical >= 0.999 and worst <= 1
    assert identical == 1.0, "edgeq.int8 is meant to be bit-exact with TFLite's reference kernels"


def test_no_float_conv_or_dense_remains(compiled):
    case, c = compiled
    heavy = []

    def visit(expr):
        if isinstance(expr, tvm.relax.Call) and isinstance(expr.op, tvm.ir.Op):
            if expr.op.name in ("relax.nn.conv2d", "relax.matmul", "relax.nn.conv2d_transpose", "relax.linear"):
                heavy.append((expr.op.name, [str(a.ty.dtype) for a in expr.args], str(expr.ty.dtype)))

    tvm.relax.analysis.post_order_visit(c.module["main"], visit)
    assert heavy, "expected conv2d/matmul ops in the module"
    for name, input_dtypes, out_dtype in heavy:
        assert all(d in ("int8", "uint8", "int16") for d in input_dtypes), (name, input_dtypes)
        assert out_dtype == "int32", (name, out_dtype)
    report = c.report
    assert report.macs_total > 0 and report.macs_integer / report.macs_total >= 0.99
    assert set(report.to_dict()) >= {"ops_total", "ops_integer", "macs_total", "macs_integer", "float_ops"}
    assert "multiply-accumulates" in report.summary()


def test_float_model_is_rejected():
    from edgeq.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="integer importer"):
        import_integer(shared_path("models", "tflite", "mediapipe_face_detection_short_range_float.tflite"))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the optimized kernels' rounding is x86's")
@pytest.mark.parametrize("name,min_identical", [("resnet", 1.0), ("vww", 1.0), ("rps", 1.0)])
def test_optimized_flavour_matches_default_interpreter(name, min_identical):
    """kernels="optimized" against the interpreter everyone runs by default (x86 optimized kernels)."""
    case = CASES[name]
    path = shared_path("models", "tflite", case.model)
    module, _ = import_integer(path, kernels="optimized")
    vm = tvm.runtime.vm.VirtualMachine(tvm.compile(module, target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    interpreter = litert.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    equal = total = 0
    for picture in _pictures(case):
        x = case.make_input(picture)
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        expected = interpreter.get_tensor(out["index"])
        actual = vm["main"](tvm.runtime.tensor(x))[0].numpy()
        equal += int((actual == expected).sum())
        total += expected.size
        assert int(actual.argmax()) == int(expected.argmax())
    assert equal / total >= min_identical
