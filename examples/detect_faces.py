"""Find faces in a picture with the BlazeFace bundle and draw them (device side).

    python examples/detect_faces.py faces.edgeq photo.jpg [drawn.png]

Package MediaPipe's short-range face detector once on a host (edgeq recognises it and records
its anchors, box decoding and non-maximum suppression in the bundle)::

    edgeq package face_detection_short_range.tflite --letterbox -o faces.edgeq

Prints one line per face (score, box and keypoints in the picture's pixels) and writes the
picture with the boxes and keypoints drawn to ``drawn.png`` (default: PHOTO-faces.png).
"""
from __future__ import annotations

import sys
from pathlib import Path

import edgeq
from edgeq.draw import draw_detections

# BlazeFace's six keypoints, in the order MediaPipe names them.
KEYPOINTS = ("right eye", "left eye", "nose tip", "mouth", "right ear", "left ear")


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    bundle, photo = argv[0], Path(argv[1])
    out = Path(argv[2]) if len(argv) == 3 else photo.with_name(f"{photo.stem}-faces.png")
    faces = edgeq.load(bundle).predict(photo)
    if not isinstance(faces, edgeq.Detections):
        print(f"{bundle} is not a detector (its post-processing is not detection)", file=sys.stderr)
        return 1
    print(f"{photo}: {len(faces)} face(s)")
    for face in faces:
        x0, y0, x1, y1 = face.box
        print(f"  score {face.score:.2f}  box ({x0:.0f}, {y0:.0f}) - ({x1:.0f}, {y1:.0f})")
        for name, (x, y) in zip(KEYPOINTS, face.keypoints):
            print(f"    {name:<10} ({x:.0f}, {y:.0f})")
    draw_detections(photo, faces).save(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
