"""Time ``edgeq.package`` per model and device: how long a user waits for a bundle.

The runtime libraries of every device's architecture are fetched (or found in the cache) before
timing, so the numbers are for a warm runtime cache: import, compile, cross-link, bundle.
Each (model, device) is packaged in a fresh process, as a user's ``edgeq package`` would be.

    python benchmarks/package_time.py [--models efficientnet_lite0_uint8.tflite ...]
                                      [--devices x86_64 rpi4] [--no-schedules]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO.parent / "shared" / "models" / "tflite"
DEFAULT_MODELS = ("efficientnet_lite0_uint8.tflite",)
DEFAULT_DEVICES = ("x86_64", "rpi4")

# Run in a child process: package one model for one device, print {"seconds": ...} as JSON.
_CHILD = r"""
import json, sys, time
import edgeq
model, device, out, schedules = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
options = edgeq.PackageOptions(device=device, compile=edgeq.CompileOptions(default_schedules=schedules))
start = time.perf_counter()
result = edgeq.package(model, out, options)
print(json.dumps({"seconds": time.perf_counter() - start, "reported": result.seconds}))
"""


def warm_runtime_cache(devices: list[str]) -> None:
    from edgeq.devices import get_device
    from edgeq.runtime_libs import runtime_libraries

    for arch in sorted({get_device(name).arch for name in devices}):
        runtime_libraries(arch, progress=lambda msg: print(f"  {msg}", file=sys.stderr))


def package_seconds(model: Path, device: str, schedules: bool) -> float:
    with tempfile.TemporaryDirectory(prefix="edgeq-bench-") as work:
        out = Path(work) / f"{model.stem}-{device}.edgeq"
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(model), device, str(out), "1" if schedules else "0"],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(f"packaging {model.name} for {device} failed:\n{proc.stderr[-3000:]}")
        return float(json.loads(proc.stdout.strip().splitlines()[-1])["seconds"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="files in ../shared/models/tflite")
    parser.add_argument("--devices", nargs="+", default=list(DEFAULT_DEVICES))
    parser.add_argument("--no-schedules", action="store_true", help="package without edgeq's CPU schedules")
    args = parser.parse_args(argv)

    warm_runtime_cache(args.devices)
    print(f"# edgeq package time, {platform.machine()}, {os.cpu_count()} cores, "
          f"schedules {'off' if args.no_schedules else 'on'}, warm runtime cache")
    rows = []
    for name in args.models:
        model = MODELS / name
        if not model.exists():
            raise SystemExit(f"{model} is missing: the benchmark needs ../shared beside the repo")
        for device in args.devices:
            seconds = package_seconds(model, device, not args.no_schedules)
            rows.append((name, device, seconds))
            print(f"  {name} {device}: {seconds:.1f} s", file=sys.stderr)
    width = max(len("model"), *(len(r[0]) for r in rows))
    print(f"| {'model':<{width}} | device | seconds |")
    print(f"|{'-' * (width + 2)}|--------|---------|")
    for name, device, seconds in rows:
        print(f"| {name:<{width}} | {device:<6} | {seconds:7.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
