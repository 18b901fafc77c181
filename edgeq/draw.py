"""Draw detections on the original picture with Pillow's ImageDraw (device side)."""
from __future__ import annotations

from typing import Iterable

from PIL import Image, ImageDraw

from .detection import Detection
from .preprocess import ImageLike, open_image

BOX_COLOR = (255, 0, 0)
KEYPOINT_COLOR = (0, 255, 0)


def draw_detections(
    image: ImageLike,
    detections: Iterable[Detection],
    color: tuple[int, int, int] = BOX_COLOR,
    keypoint_color: tuple[int, int, int] = KEYPOINT_COLOR,
    width: int | None = None,
    labels: bool = True,
) -> Image.Image:
    """An RGB copy of ``image`` with each detection's box, keypoints and score drawn on it.

    ``width`` is the line width in pixels (default: about 1/200 of the picture's longer side).
    """
    picture = open_image(image).convert("RGB")
    line = width or max(1, round(max(picture.size) / 200))
    draw = ImageDraw.Draw(picture)
    for detection in detections:
        x0, y0, x1, y1 = detection.box
        draw.rectangle((x0, y0, max(x0, x1), max(y0, y1)), outline=color, width=line)
        radius = line + 1
        for x, y in detection.keypoints:
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=keypoint_color)
        if labels:
            text = f"{detection.label + ' ' if detection.label else ''}{detection.score:.2f}"
            draw.text((x0 + line + 1, y0 + line + 1), text, fill=color)
    return picture
