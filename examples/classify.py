"""Classify pictures with an edgeq bundle, on the device (needs only numpy, Pillow and cffi).

    python examples/classify.py model.edgeq cat.jpg [more.jpg ...]

Make the bundle on a host first, e.g. with the demo model::

    python examples/make_colour_model.py demo
    edgeq package demo/colours.tflite -o demo/colours.edgeq
    python examples/classify.py demo/colours.edgeq demo/red.png
"""
from __future__ import annotations

import sys
import time

import edgeq


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    predictor = edgeq.load(argv[0])  # verifies checksums, format and architecture
    for picture in argv[1:]:
        started = time.perf_counter()
        result = predictor.predict(picture, top_k=3)
        if not isinstance(result, edgeq.Classification):
            print(f"{argv[0]} is not a classifier; see examples/detect_faces.py", file=sys.stderr)
            return 1
        print(f"{picture}: {result.top.label} ({result.top.score:.3f}) in {1e3 * (time.perf_counter() - started):.1f} ms")
        for choice in result.classes[1:]:
            print(f"    {choice.label} ({choice.score:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
