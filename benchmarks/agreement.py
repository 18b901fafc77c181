"""Agreement of x86_64 bundles with TFLite on the shared models and pictures, one table.

For each shared TFLite model: package it with edgeq's defaults, run every fitting picture through
the bundle (thin runtime) and through TFLite's reference kernels and its default optimized
kernels, and print the share of identical output elements, the largest difference (in
quantization steps ("st") for integer outputs, 1/256 steps for dequantized softmax outputs,
relative error ("rel") for float models) and top-1 agreement.

    python benchmarks/agreement.py [--device x86_64] [--pictures N]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import edgeq  # noqa: E402
from bundles import OUTPUT_KIND, PICTURES, PREPROCESS, output_difference, pictures_for  # noqa: E402
from conftest import SHARED  # noqa: E402
from edgeq.reference import ReferenceInterpreter  # noqa: E402


def compare(kind: str, got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(share identical, largest difference in the unit of ``kind``)."""
    diff = output_difference(kind, got, want)
    return float(np.mean(diff == 0)), float(diff.max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="x86_64")
    parser.add_argument("--pictures", type=int, default=0, help="at most N pictures per model (0: all)")
    args = parser.parse_args()
    print(f"{'model':<52} {'pics':>4}  {'vs reference kernels':>28}  {'vs default kernels':>28}")
    print(f"{'':<52} {'':>4}  {'identical':>10} {'max diff':>9} {'top-1':>7}  {'identical':>10} {'max diff':>9} {'top-1':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(PICTURES):
            model = SHARED / "models" / "tflite" / name
            options = edgeq.PackageOptions(device=args.device, preprocess=PREPROCESS.get(name, {}))
            predictor = edgeq.load(edgeq.package(model, Path(tmp) / f"{model.stem}.edgeq", options).path)
            references = [ReferenceInterpreter(model, kernels=k) for k in ("reference", "default")]
            pictures = pictures_for(name)[: args.pictures or None]
            stats = [[[], 0.0, 0] for _ in references]
            for picture in pictures:
                inputs = predictor.preprocess(picture)
                ours = predictor.run(inputs)
                for stat, reference in zip(stats, references):
                    for got, want in zip(ours, reference.run(inputs)):
                        identical, worst = compare(OUTPUT_KIND[name], got, want)
                        stat[0].append(identical)
                        stat[1] = max(stat[1], worst)
                    stat[2] += int(np.argmax(ours[0]) == np.argmax(reference.run(inputs)[0]))
            unit = "rel" if OUTPUT_KIND[name] == "float" else "st"
            cells = [f"{np.mean(s[0]):10.3%} {s[1]:6.3g} {unit:<3} {s[2]:>3}/{len(pictures):<3}" for s in stats]
            print(f"{name:<52} {len(pictures):>4}  {cells[0]}  {cells[1]}", flush=True)


if __name__ == "__main__":
    main()
