"""Prepare the GPU check: package GPU bundles here (no GPU needed) with reference outputs beside them.

Writes into OUT (default ``.gpu-check/``):
- ``<name>.edgeq``: EfficientNet-Lite0 for the GPU in fp32 (TVM's float lowering of the uint8
  model), fp16 (--quantize fp16) and int8 (edgeq's integer kernels), and the small MLPerf Tiny
  ResNet int8;
- ``<name>.inputs.npy`` / ``<name>.reference.npy``: the pre-processed input tensors of the
  shared pictures and the TFLite reference interpreter's raw outputs for them;
- ``checks.json``: what ``gpu_check.py`` compares, and how;
- ``wheels/``: the edgeq wheel and the cffi/pycparser wheels for the device's Python, so the
  device needs only Python 3 with numpy and Pillow and an NVIDIA driver.

    python benchmarks/prepare_gpu_check.py [--device cuda-sm90] [--out .gpu-check] [--pictures 10]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import edgeq  # noqa: E402
from bundles import PREPROCESS, pictures_for  # noqa: E402
from conftest import SHARED  # noqa: E402
from edgeq.preprocess import picture_to_tensor_mapped  # noqa: E402
from edgeq.reference import ReferenceInterpreter  # noqa: E402

EFFICIENTNET = "efficientnet_lite0_uint8.tflite"
RESNET = "mlperf_tiny_resnet_cifar10_int8.tflite"
# name -> (model, precision label, compile options); "steps" = largest allowed output difference
# in quantization steps against TFLite's reference kernels.
VARIANTS = {
    "efficientnet_lite0_int8": (EFFICIENTNET, "int8", edgeq.CompileOptions(), 1),
    "efficientnet_lite0_fp32": (EFFICIENTNET, "fp32", edgeq.CompileOptions(integer_lowering=False), None),
    "efficientnet_lite0_fp16": (EFFICIENTNET, "fp16", edgeq.CompileOptions(precision="fp16"), None),
    "resnet_cifar10_int8": (RESNET, "int8", edgeq.CompileOptions(), 1),
    # the same int8 bundle launching each kernel on its own: what the CUDA graph saves
    "efficientnet_lite0_int8_nograph": (EFFICIENTNET, "int8", edgeq.CompileOptions(cuda_graph=False), 1),
}


def device_wheels(dest: Path, python_version: str) -> None:
    """The edgeq wheel and cffi + pycparser wheels for the device's CPython (x86_64 manylinux)."""
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "-q", "-w", str(dest), str(REPO)], check=True)
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest),
                    "--python-version", python_version, "--implementation", "cp",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                    "cffi==2.0.0", "pycparser"], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda-sm90")
    parser.add_argument("--out", type=Path, default=REPO / ".gpu-check")
    parser.add_argument("--pictures", type=int, default=10, help="pictures per model")
    parser.add_argument("--python", default="3.12", help="the device's Python version (for wheels)")
    parser.add_argument("--only", nargs="*", help="variants to prepare (default: all)")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    checks = {}
    for name, (model_name, precision, compile_options, steps) in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        model = SHARED / "models" / "tflite" / model_name
        options = edgeq.PackageOptions(device=args.device, preprocess=PREPROCESS.get(model_name, {}),
                                       compile=compile_options)
        print(f"== {name}: packaging {model_name} for {args.device} ({precision})", flush=True)
        result = edgeq.package(model, out / f"{name}.edgeq", options, progress=lambda m: print("  " + m, flush=True))
        # Pre-processed here once, as the bundle's manifest says: the device check feeds exactly
        # these tensors to the bundle and to nothing else.
        spec, pre = result.manifest.inputs[0], result.manifest.preprocess
        pictures = pictures_for(model_name)[: args.pictures]
        inputs = np.stack([picture_to_tensor_mapped(picture, spec, pre)[0] for picture in pictures])
        reference = ReferenceInterpreter(model)
        outputs = np.stack([reference.run(tensor)[0] for tensor in inputs])
        np.save(out / f"{name}.inputs.npy", inputs)
        np.save(out / f"{name}.reference.npy", outputs)
        checks[name] = {"bundle": f"{name}.edgeq", "model": model_name, "precision": precision,
                        "max_steps": steps, "pictures": int(len(inputs)),
                        "kernels": result.manifest.compile_report.get("cuda", {}).get("kernels")}
    existing = json.loads((out / "checks.json").read_text()) if (out / "checks.json").exists() else {}
    (out / "checks.json").write_text(json.dumps({**existing, **checks}, indent=2) + "\n")
    wheels = out / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    device_wheels(wheels, args.python)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"prepared {len(checks)} bundles in {out} ({total / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
