"""The ``edgeq`` command: a thin layer over the library; EdgeqError becomes a one-line message."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

from .errors import EdgeqError

EXIT_ERROR = 1
EXIT_USAGE = 2


def _progress_printer() -> callable:
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    return say


def cmd_package(args: argparse.Namespace) -> int:
    from .compiler import CompileOptions
    from .packager import PackageOptions, package

    overrides: dict[str, object] = {}
    if args.mean is not None:
        overrides["mean"] = tuple(args.mean)
        overrides["raw_pixels"] = False
    if args.std is not None:
        overrides["std"] = tuple(args.std)
        overrides["raw_pixels"] = False
    if args.standardize:
        overrides.update(standardize=True, raw_pixels=False)
    if args.raw_pixels:
        overrides["raw_pixels"] = True
    if args.color:
        overrides["color"] = args.color
    if args.resize:
        overrides["resize"] = args.resize
    if args.center_crop is not None:
        overrides["center_crop"] = args.center_crop
    if args.letterbox:
        overrides["letterbox"] = True
    postprocess = None
    if args.postprocess is not None:
        from .packager import read_postprocess

        postprocess = read_postprocess(args.postprocess)
    compile_options = CompileOptions(
        integer_lowering=not args.no_integer,
        default_schedules=not args.no_schedules,
        tuning_db=args.tuning_db,
        fuse_float_multiply_add=args.fma,
    )
    if args.quantize == "fp16":
        compile_options = replace(compile_options, precision="fp16")
    options = PackageOptions(
        device=args.device,
        labels=args.labels,
        preprocess=overrides,
        postprocess=postprocess,
        compile=compile_options,
        runtime_wheels=args.runtime_wheels,
        quantize=_quant_config(args),
        calibration=args.calibration,
        evaluation=args.eval,
    )
    result = package(args.model, args.output, options, progress=_progress_printer())
    report = result.manifest.compile_report
    if report.get("summary"):
        print(report["summary"], file=sys.stderr)
    if args.report == "json":
        print(json.dumps(report, indent=2))
    size = result.path.stat().st_size / 1e6
    print(f"wrote {result.path} ({size:.1f} MB) for {result.manifest.target.device} in {result.seconds:.1f} s")
    return 0


def _quant_config(args: argparse.Namespace):
    """QuantConfig for --quantize int8/auto, or None (errors when calibration flags come without it)."""
    if args.quantize not in ("int8", "auto"):
        used_with = "; fp16 needs no calibration" if args.quantize == "fp16" else ""
        for flag, value in (("--calibration", args.calibration), ("--max-accuracy-drop", args.max_accuracy_drop),
                            ("--eval", args.eval)):
            if value is not None:
                raise EdgeqError(f"{flag} is only used with --quantize int8 or --quantize auto{used_with}")
        return None
    from .quantization import QuantConfig
    from .quantization.config import DEFAULT_MAX_ACCURACY_DROP

    if args.calibration is None:
        raise EdgeqError(f"--quantize {args.quantize} needs --calibration DIR, a folder of pictures like the model's inputs")
    budget = args.max_accuracy_drop
    if budget is None and args.quantize == "auto":
        budget = DEFAULT_MAX_ACCURACY_DROP
    if args.eval is not None and budget is None:
        raise EdgeqError("--eval DIR measures the accuracy budget: add --max-accuracy-drop PCT or use --quantize auto")
    return QuantConfig(method=args.calibration_method, samples=args.samples, symmetric=args.symmetric,
                       max_accuracy_drop=budget)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .bundle import read_bundle

    bundle = read_bundle(args.bundle)
    manifest = bundle.manifest
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2))
        return 0
    print(f"bundle       {bundle.path} (format {manifest.format_version}, edgeq {manifest.edgeq_version})")
    print(f"model        {manifest.source.name} ({manifest.source.format}, sha256 {manifest.source.sha256[:16]}…)")
    print(f"device       {manifest.target.device} ({manifest.target.arch}, {manifest.target.kind})")
    print(f"tvm target   {json.dumps(manifest.target.tvm_target)}")
    print(
        f"runtime      TVM {manifest.runtime.tvm_version}, tvm-ffi {manifest.runtime.tvm_ffi_version}, "
        f"{manifest.runtime.platform}, glibc >= {manifest.runtime.glibc_floor}"
    )
    if manifest.gpu is not None:
        gpu = manifest.gpu
        print(
            f"gpu          {gpu.arch} kernels ({len(gpu.kernels)} fatbin, {gpu.compiler}), CUDA {gpu.cuda_runtime} "
            f"runtime (NVIDIA driver >= {gpu.min_driver}), {gpu.precision} precision"
            + (", CUDA graph" if gpu.cuda_graph else "")
        )
    for kind, specs in (("input", manifest.inputs), ("output", manifest.outputs)):
        for spec in specs:
            quant = ""
            if spec.quantization:
                q = spec.quantization
                quant = f"  scale {q.scale[0]:.6g} zero_point {q.zero_point[0]}" if q.per_tensor else f"  per-channel ({len(q.scale)})"
            layout = f" {spec.layout}" if spec.layout else ""
            print(f"{kind:<12} {spec.name}: {spec.dtype}{list(spec.shape)}{layout}{quant}")
    print(f"preprocess   {asdict(manifest.preprocess)}")
    print(f"postprocess  {asdict(manifest.postprocess)}")
    print(f"labels       {len(manifest.labels)}" + (f" ({', '.join(manifest.labels[:3])}, …)" if manifest.labels else ""))
    if manifest.compile_report.get("summary"):
        print(f"compiler     {manifest.compile_report['summary']}")
    for entry in manifest.files:
        print(f"file         {entry.path:<28} {entry.size / 1e6:7.2f} MB  sha256 {entry.sha256[:16]}…")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .detection import Detections
    from .predictor import DETECTION_KINDS, load

    predictor = load(args.bundle, num_threads=args.threads)
    if args.draw is not None and predictor.manifest.postprocess.kind not in DETECTION_KINDS:
        raise EdgeqError(f"--draw needs a detection bundle; this one's post-processing is "
                         f"{predictor.manifest.postprocess.kind!r}")
    if args.draw is not None and len(args.images) > 1:
        args.draw.mkdir(parents=True, exist_ok=True)
    for image in args.images:
        result = predictor.predict(image, top_k=args.top_k)
        if args.draw is not None:
            from .draw import draw_detections

            out = args.draw / f"{Path(image).stem}.png" if len(args.images) > 1 else args.draw
            draw_detections(image, result).save(out)
        if args.json:
            key = "detections" if isinstance(result, Detections) else "classes"
            values = result.detections if isinstance(result, Detections) else result.classes
            print(json.dumps({"image": str(image), key: [asdict(v) for v in values]}))
        else:
            print(f"{image}:")
            print(result)
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from .devices import list_devices

    devices = list_devices()
    if args.json:
        print(json.dumps([asdict(d) for d in devices], indent=2))
        return 0
    width = max(len(d.name) for d in devices)
    for device in devices:
        print(f"{device.name:<{width}}  {device.arch:<8} {device.kind:<5} {device.status:<11} {device.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("package", help="compile a model into a bundle for a device")
    p.add_argument("model", type=Path, help="a .tflite or .onnx model")
    p.add_argument("--device", "-d", default="x86_64", help="deploy target (see `edgeq devices`)")
    p.add_argument("--output", "-o", type=Path, help="bundle path (default: MODEL.edgeq here)")
    p.add_argument("--labels", type=Path, help="labels file, one per line, in class order")
    p.add_argument("--mean", type=float, nargs="+", help="per-channel pixel mean (0..255 scale)")
    p.add_argument("--std", type=float, nargs="+", help="per-channel pixel std (0..255 scale)")
    p.add_argument("--standardize", action="store_true", help="standardise each picture to mean 0, std 1")
    p.add_argument("--raw-pixels", action="store_true", help="feed pixels 0..255 unchanged (int8: pixel-128)")
    p.add_argument("--color", choices=["rgb", "bgr", "grey"], help="colour conversion before resizing")
    p.add_argument("--resize", choices=["bilinear", "nearest", "bicubic", "lanczos"], help="resize method")
    p.add_argument("--center-crop", type=float, help="keep this fraction of the shorter side, centred")
    p.add_argument("--letterbox", action="store_true", help="keep the aspect ratio when resizing, padding the rest")
    p.add_argument("--postprocess", type=Path, metavar="FILE.json",
                   help="post-processing fields as JSON (e.g. detection anchors/decode/nms options)")
    p.add_argument("--no-integer", action="store_true", help="keep TVM's stock dequantize/float/quantize lowering")
    p.add_argument("--no-schedules", action="store_true", help="skip edgeq's CPU schedules (stock TVM loops)")
    p.add_argument("--tuning-db", type=Path, metavar="DIR",
                   help="use the kernels `edgeq tune` found faster than edgeq's schedules for this device")
    p.add_argument("--fma", action="store_true",
                   help="let float multiply-adds fuse into FMA instructions: faster float kernels on ARM and "
                        "AVX2, but float outputs then differ between CPUs in the last bits")
    p.add_argument("--runtime-wheels", type=Path, help="folder of apache-tvm/apache-tvm-ffi wheels (offline)")
    p.add_argument("--quantize", choices=["int8", "auto", "fp16"],
                   help="int8: calibrate a float model and package its int8 twin; auto: int8 with an accuracy "
                        "budget of 1 point (--max-accuracy-drop); fp16: run float ops in "
                        "float16 (TVM ToMixedPrecision; for ARMv8.2+ and CUDA, no calibration)")
    p.add_argument("--calibration", type=Path, metavar="DIR", help="folder of calibration pictures (--quantize)")
    p.add_argument("--calibration-method", choices=["minmax", "percentile", "entropy"], default="minmax",
                   help="activation ranges: observed min/max, the central 99.999%% of values, or the "
                        "KL-divergence (entropy) clipping threshold")
    p.add_argument("--samples", type=int, default=100, help="calibration pictures used at most (default 100)")
    p.add_argument("--symmetric", action="store_true", help="symmetric int8 activations (zero point 0)")
    p.add_argument("--max-accuracy-drop", type=float, metavar="PCT",
                   help="top-1 points the int8 model may lose against the float model; the most sensitive "
                        "layers return to float until it holds (--quantize int8/auto)")
    p.add_argument("--eval", type=Path, metavar="DIR",
                   help="evaluation pictures for --max-accuracy-drop: sub-folders named by class index or label, "
                        "or pictures directly inside (scored by agreement with the float model); default: "
                        "every 4th calibration picture, by agreement")
    p.add_argument("--report", choices=["text", "json"], default="text", help="print the compile report as JSON")
    p.set_defaults(func=cmd_package)

    p = sub.add_parser("inspect", help="show a bundle's manifest, tensors and files")
    p.add_argument("bundle", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("predict", help="classify pictures, or detect objects in them, with a bundle")
    p.add_argument("bundle", type=Path)
    p.add_argument("images", nargs="+")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="one JSON line per picture (classes or detections)")
    p.add_argument("--draw", type=Path, metavar="OUT.png",
                   help="write the picture with the detections drawn (a folder for several pictures)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("devices", help="list the registered deploy targets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_devices)

    from .cli_remote import add_remote_commands

    add_remote_commands(sub)
    from .cli_tune import add_tune_parser

    add_tune_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EdgeqError as error:
        print(f"edgeq: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("edgeq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
