"""Run the prepared GPU bundles on this machine's NVIDIA GPU: agreement with the stored TFLite
reference outputs, load time and batch-1 latency (median of 100 runs), one table.

Device side only: needs Python 3 with numpy, Pillow and cffi, edgeq (the wheel in the prepared
folder) and an NVIDIA driver; no tvm, no compiler. See gpu_check.sh.

    python3 benchmarks/gpu_check.py [PREPARED_DIR] [--runs 100]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import edgeq


def steps(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Element-wise difference in quantization steps (integer outputs) or as is (float outputs)."""
    return np.abs(got.astype(np.float64) - want.astype(np.float64))


def check(folder: Path, name: str, spec: dict, runs: int) -> dict:
    started = time.perf_counter()
    predictor = edgeq.load(folder / spec["bundle"])
    load_ms = (time.perf_counter() - started) * 1e3
    inputs = np.load(folder / f"{name}.inputs.npy")
    reference = np.load(folder / f"{name}.reference.npy")
    outputs = np.stack([predictor.run(tensor)[0] for tensor in inputs])
    diff = steps(outputs, reference)
    top1 = int(sum(np.argmax(o) == np.argmax(r) for o, r in zip(outputs, reference)))
    for _ in range(10):  # warm-up: first runs capture the CUDA graph
        predictor.run(inputs[0])
    latencies = []
    for index in range(runs):
        tensor = inputs[index % len(inputs)]
        start = time.perf_counter()
        predictor.run(tensor)
        latencies.append((time.perf_counter() - start) * 1e3)
    within = spec.get("max_steps")
    passed = top1 == len(inputs) and (within is None or diff.max() <= within)
    return {
        "name": name, "precision": spec["precision"], "gpu": predictor.gpu_name,
        "pictures": int(len(inputs)), "identical": float(np.mean(diff == 0)), "max_diff": float(diff.max()),
        "top1": int(top1), "load_ms": load_ms, "p50_ms": statistics.median(latencies),
        "p90_ms": float(np.percentile(latencies, 90)), "kernels": spec.get("kernels"), "pass": bool(passed),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, default=Path(".gpu-check"))
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    specs = json.loads((args.folder / "checks.json").read_text())
    rows, failures = [], []
    for name, spec in specs.items():
        try:
            rows.append(check(args.folder, name, spec, args.runs))
        except edgeq.EdgeqError as error:
            failures.append(f"{name}: {type(error).__name__}: {error}")
            print(failures[-1], file=sys.stderr, flush=True)
    if rows:
        print(f"GPU: {rows[0]['gpu']}")
    print(f"{'bundle':<26} {'prec':<5} {'kernels':>7} {'pics':>4} {'identical':>9} {'max diff':>9} "
          f"{'top-1':>6} {'load ms':>8} {'p50 ms':>7} {'p90 ms':>7}  result")
    for r in rows:
        print(f"{r['name']:<26} {r['precision']:<5} {r['kernels'] or '-':>7} {r['pictures']:>4} "
              f"{r['identical']:9.2%} {r['max_diff']:9.3g} {r['top1']:>3}/{r['pictures']:<2} "
              f"{r['load_ms']:8.0f} {r['p50_ms']:7.3f} {r['p90_ms']:7.3f}  {'PASS' if r['pass'] else 'FAIL'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if rows and not failures and all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
