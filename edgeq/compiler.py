"""Host side: TFLite or ONNX model -> Relax -> a compiled, exported library for one device.

TVM is imported lazily so that ``import edgeq`` stays light on devices.
"""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Union

from .devices import Device
from .errors import EdgeqError, MissingDependencyError, UnsupportedModelError
from .onnx_model import OnnxModel
from .tflite_model import TFLiteModel

if TYPE_CHECKING:
    from .cuda_build import CudaKernels

Progress = Callable[[str], None]
PRECISIONS = ("native", "fp16")
SourceModel = Union[TFLiteModel, OnnxModel]
QDQ_ONNX_SUMMARY = (
    "QDQ ONNX model: runs in TVM's dequantize -> float -> quantize lowering (edgeq's bit-exact "
    "integer kernels are TFLite-only); outputs follow onnxruntime's within rounding steps"
)


@dataclass(frozen=True)
class CompileOptions:
    """How edgeq compiles a model."""

    integer_lowering: bool = True  # run quantized graphs on edgeq's integer kernels
    default_schedules: bool = True  # apply edgeq's CPU schedules (threads, vectors, tiling)
    precision: str = "native"  # "native" (the model's own dtypes) or "fp16" (float ops downcast)
    cuda_graph: bool = True  # GPU bundles: replay the model's kernel launches as one CUDA graph
    tuning_db: Path | None = None  # CPU: an `edgeq tune` database whose tuned kernels replace edgeq's
    # CPU: let LLVM fuse float a*b+c into FMA instructions (faster float kernels on ARM and AVX2);
    # float outputs then differ between CPUs in the last bits. Off: the same bits everywhere.
    fuse_float_multiply_add: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise EdgeqError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")


@dataclass(frozen=True)
class CompiledLibrary:
    """The exported library's bytes and what the compiler did."""

    data: bytes
    report: dict[str, Any] = field(default_factory=dict)
    kernels: CudaKernels | None = None  # GPU bundles: the kernels compiled for the device's chip


def _tvm():
    try:
        import tvm

        return tvm
    except ImportError:
        raise MissingDependencyError(
            "packaging needs Apache TVM on this machine: pip install 'edgeq[host]'"
        ) from None


def check_supported_ops(model: TFLiteModel) -> None:
    """Raise UnsupportedModelError naming every op TVM's TFLite frontend cannot import."""
    tvm = _tvm()
    import tflite
    from tvm import relax
    from tvm.relax.frontend.tflite import tflite_frontend as frontend

    tfl_model = tflite.Model.GetRootAsModel(model.data, 0)
    converter = frontend.OperatorConverter(
        tfl_model, tfl_model.Subgraphs(0), frontend.ExprTable(), relax.BlockBuilder()
    )
    try:
        converter.check_unsupported_ops()
    except tvm.error.OpNotImplemented as error:
        raise UnsupportedModelError(
            f"{model.path.name} cannot be compiled:\n{str(error).strip()}\n"
            "Export the model again with TFLite builtin ops only (no custom or unsupported ops)."
        ) from None


@contextmanager
def _importer_errors(model: SourceModel, importer: str) -> Iterator[None]:
    """Turn a TVM importer's errors into UnsupportedModelError naming the model."""
    tvm = _tvm()
    try:
        yield
    except tvm.error.OpNotImplemented as error:
        raise UnsupportedModelError(f"{model.path.name} cannot be compiled:\n{str(error).strip()}") from None
    except Exception as error:  # the importers raise assorted errors on graphs they cannot convert
        raise UnsupportedModelError(
            f"TVM's {importer} importer could not convert {model.path.name}: {_first_line(error)}"
        ) from None


def import_stock(model: TFLiteModel) -> Any:
    """The model through TVM's own TFLite importer (quantized ops become dequantize/float/quantize)."""
    _tvm()  # a clear error when the host extras are missing
    import tflite
    import tvm.relax.frontend.tflite as frontend

    with _importer_errors(model, "TFLite"):
        return frontend.from_tflite(tflite.Model.GetRootAsModel(model.data, 0))


def unsupported_onnx_ops(model: OnnxModel) -> list[str]:
    """The op types of ``model`` that TVM's Relax ONNX importer has no converter for."""
    _tvm()
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = _get_convert_map()
    return sorted({op for op in model.ops if op not in known})


def import_onnx(model: OnnxModel) -> Any:
    """The model through TVM's Relax ONNX importer, weights bound as constants, batch fixed to 1.

    QDQ models keep QuantizeLinear/DequantizeLinear, which TVM lowers to float arithmetic.
    """
    _tvm()
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    missing = unsupported_onnx_ops(model)
    if missing:
        raise UnsupportedModelError(
            f"{model.path.name} cannot be compiled: TVM's ONNX importer does not support the op(s) "
            f"{', '.join(missing)}. Export the model again without them (e.g. a different opset or "
            "exporter options), or replace them with supported ops."
        )
    shapes = {spec.name: list(spec.shape) for spec in model.inputs}
    dtypes = {spec.name: spec.dtype for spec in model.inputs}
    with _importer_errors(model, "ONNX"):
        mod = from_onnx(model.proto(), shape_dict=shapes, dtype_dict=dtypes, opset=model.opset or None,
                        keep_params_in_input=False, sanitize_input_names=False)
        mod = relax.transform.DecomposeOpsForInference()(mod)  # batch_norm -> scale and shift
        return relax.transform.FoldConstant()(mod)


def import_model(model: SourceModel, options: CompileOptions) -> tuple[Any, dict[str, Any]]:
    """Relax module for ``model`` and a report of how it was imported.

    Quantized TFLite models go through edgeq's integer importer (an op it has no integer kernel
    for runs alone in TVM's dequantize -> float -> quantize, named in the report); if it cannot
    lower the model at all (an op variant it refuses, several subgraphs), TVM's stock importer
    takes over for the whole model and the report says why.
    ONNX models go through TVM's ONNX importer (QDQ models in its dequantize -> float -> quantize
    lowering).
    """
    if isinstance(model, OnnxModel):
        report: dict[str, Any] = {"importer": "tvm-onnx", "opset": model.opset}
        if model.is_qdq:
            report["summary"] = QDQ_ONNX_SUMMARY
        return import_onnx(model), report
    if model.is_quantized and options.integer_lowering:
        from .int8 import import_integer

        try:
            mod, report = import_integer(model.path)
        except UnsupportedModelError as error:
            check_supported_ops(model)
            summary = (
                f"integer lowering is not possible ({error}); the whole model runs in TVM's "
                "dequantize -> float -> quantize lowering, not bit-exact with TFLite"
            )
            return import_stock(model), {"importer": "tvm-stock", "summary": summary}
        return mod, {"importer": "edgeq-integer", "integer": report.to_dict(), "summary": report.summary()}
    check_supported_ops(model)
    return import_stock(model), {"importer": "tvm-stock"}


def tvm_target(device: Device) -> Any:
    tvm = _tvm()
    if device.tvm_target is None:
        raise EdgeqError(f"device {device.name!r} has no TVM target")
    return tvm.target.Target(device.tvm_target)


def build(mod: Any, device: Device, options: CompileOptions) -> Any:
    """Compile a Relax module into an executable for the device's CPU or GPU."""
    target = tvm_target(device)
    if device.kind == "cuda":
        from .cuda_build import build_cuda

        if options.tuning_db is not None:
            raise EdgeqError("--tuning-db holds CPU kernels (edgeq tune); GPU bundles use edgeq's GPU schedules")
        return build_cuda(mod, target, cuda_graph=options.cuda_graph)
    if options.tuning_db is not None and not options.default_schedules:
        raise EdgeqError("--tuning-db needs edgeq's schedules: drop --no-schedules")
    if options.default_schedules:
        from .schedules import build_cpu

        return build_cpu(mod, target, tuning_db=options.tuning_db,
                         fuse_float_multiply_add=options.fuse_float_multiply_add)
    return _tvm().compile(mod, target=target)


def export(executable: Any, device: Device) -> bytes:
    """Link the executable into a shared library for the device (cross-compiling if needed)."""
    workdir = Path(tempfile.mkdtemp(prefix="edgeq-build-"))
    try:
        library = workdir / "model.so"
        if device.needs_cross_compiler:
            compiler = device.cross_compiler
            if not compiler or shutil.which(compiler) is None:
                package = device.cross_compiler_package or "a cross compiler"
                raise MissingDependencyError(
                    f"packaging for {device.name} ({device.arch}) needs the cross compiler "
                    f"{compiler or '?'}; install it, e.g. `sudo apt-get install {package}`"
                )
            from tvm.support import cc

            executable.export_library(str(library), fcompile=cc.cross_compiler(compiler))
        else:
            executable.export_library(str(library))
        return library.read_bytes()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def compile_model(
    model: SourceModel, device: Device, options: CompileOptions, progress: Progress = lambda _: None
) -> CompiledLibrary:
    """Import, compile and export ``model`` for ``device``."""
    progress("importing the model into Relax")
    if options.precision == "fp16":  # fp16 downcasts float ops: quantized models take the stock float import
        options = replace(options, integer_lowering=False)
    mod, report = import_model(model, options)
    if options.precision == "fp16":
        from .fp16 import downcast_fp16

        progress("downcasting float ops to fp16 (TVM ToMixedPrecision)")
        if device.kind == "cpu" and device.arch == "x86_64":
            progress("note: x86_64 has no fp16 arithmetic; LLVM converts each fp16 op, so this bundle "
                     "is slower than fp32 there (fp16 pays off on ARMv8.2+ and CUDA)")
        mod = downcast_fp16(mod)
        summary = "float ops run in fp16 (TVM ToMixedPrecision); inputs and outputs keep their dtypes"
        report = {**report, "precision": "fp16", "summary": report.get("summary") or summary}
    if options.tuning_db is not None and device.kind == "cpu":
        from .tune import best_records

        tuned = best_records(options.tuning_db, tvm_target(device)).names
        progress(f"tuning database {options.tuning_db}: {len(tuned)} tuned kernel(s) for {device.name}")
        report = {**report, "tuned_kernels": tuned}
    if device.kind == "cpu" and not options.fuse_float_multiply_add:
        report = {**report, "float_multiply_add": "kept apart (no FMA): float outputs identical across CPUs"}
    progress(f"compiling for {device.name} ({_describe_target(device)})")
    try:
        executable = build(mod, device, options)
    except EdgeqError:
        raise
    except Exception as error:
        raise EdgeqError(f"TVM failed to compile {model.path.name} for {device.name}: {_first_line(error)}") from None
    kernels = None
    if device.kind == "cuda":
        from .cuda_build import compile_kernels

        kernels = compile_kernels(executable, device.tvm_target["arch"], progress)
        report = {**report, "cuda": {"arch": kernels.arch, "kernels": kernels.kernel_count,
                                     "compiler": kernels.compiler, "cuda_graph": options.cuda_graph}}
    progress("linking the library" + (f" with {device.cross_compiler}" if device.needs_cross_compiler else ""))
    return CompiledLibrary(export(executable, device), report, kernels)


def _describe_target(device: Device) -> str:
    target = device.tvm_target or {}
    return ", ".join(f"{k}={v}" for k, v in target.items() if k != "host")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
