"""Build edgeq's demo model: a tiny int8 TFLite classifier of a picture's dominant colour.

    python examples/make_colour_model.py demo        # writes demo/colours.tflite and demo/*.png

The network is written by hand, not trained: average-pool the picture to its mean colour, then a
fully-connected layer scores each of red, green and blue as ``2 * channel - other channels``, and a
softmax turns the scores into probabilities. The labels are zipped inside the model file, as TFLite
metadata does, so ``edgeq package`` finds them.
"""
from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from edgeq.tflite_builder import Q, TFLiteBuilder

LABELS = ("red", "green", "blue")
SIZE = 32


def build_model() -> bytes:
    builder = TFLiteBuilder()
    pixels = Q(1.0, -128)  # int8 input: raw pixel - 128, real value = the pixel (0..255)
    x = builder.input((1, SIZE, SIZE, 3), "int8", pixels, name="image")
    mean_colour = builder.average_pool2d(x, SIZE)  # (1, 1, 1, 3), same quantization
    flat = builder.reshape(mean_colour, (1, 3))
    weights = np.array([[2, -1, -1], [-1, 2, -1], [-1, -1, 2]], np.int8) * 40  # real weights 2 / -1
    w = builder.constant(weights, Q(1.0 / 40))
    bias = builder.constant(np.zeros(3, np.int32), Q(1.0 / 40))
    scores = builder.fully_connected(flat, w, bias, Q(4.0, 0))  # scores in [-512, 508]
    probabilities = builder.softmax(scores, beta=0.05)
    builder.output(probabilities)
    return builder.build()


def write_pictures(folder: Path) -> None:
    rng = np.random.default_rng(0)
    for label, colour in zip(LABELS, np.eye(3, dtype=np.int64) * 200 + 30):
        noise = rng.integers(-25, 26, (48, 64, 3))
        Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8)).save(folder / f"{label}.png")


def main(folder: str) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    model = out / "colours.tflite"
    model.write_bytes(build_model())
    with zipfile.ZipFile(model, "a") as archive:  # appended zip = TFLite associated files
        archive.writestr("labels.txt", "\n".join(LABELS) + "\n")
    write_pictures(out)
    print(f"wrote {model} and {', '.join(f'{label}.png' for label in LABELS)} in {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo")
