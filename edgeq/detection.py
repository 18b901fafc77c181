"""Object detection results: SSD anchors, box/keypoint decoding and non-maximum suppression.

Device side (numpy only). Boxes are decoded the way MediaPipe's SsdAnchorsCalculator,
TensorsToDetectionsCalculator and NonMaxSuppressionCalculator do, in coordinates normalised to
the model input, then mapped to the original picture's pixels by the pre-processing's mapping.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .manifest import BoxDecodeOptions, NmsOptions, Postprocess, SsdAnchorOptions, TensorSpec
from .postprocess import dequantize

# (xs, ys) normalised to the model input -> (xs, ys) in original pixels
PointMapper = Callable[[np.ndarray, np.ndarray], "tuple[np.ndarray, np.ndarray]"]


@dataclass(frozen=True)
class Detection:
    """One detected object, in the original picture's pixel coordinates."""

    box: tuple[float, float, float, float]  # (x0, y0, x1, y1)
    score: float
    label: str = ""
    index: int = 0  # class index
    keypoints: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class Detections:
    """The detections of one picture, best first."""

    detections: tuple[Detection, ...] = field(default_factory=tuple)
    image_size: tuple[int, int] = (0, 0)  # (width, height) of the original picture

    def __len__(self) -> int:
        return len(self.detections)

    def __iter__(self):
        return iter(self.detections)

    def __getitem__(self, index: int) -> Detection:
        return self.detections[index]

    def __str__(self) -> str:
        if not self.detections:
            return "  no detections"
        return "\n".join(
            f"{d.score:8.4f}  {d.label or d.index:<12} box ({', '.join(f'{v:.1f}' for v in d.box)})"
            for d in self.detections
        )


# -- SSD anchors ----------------------------------------------------------------------------
def _scale(options: SsdAnchorOptions, index: int, count: int) -> float:
    if count == 1:
        return (options.min_scale + options.max_scale) * 0.5
    return options.min_scale + (options.max_scale - options.min_scale) * index / (count - 1.0)


def generate_anchors(options: SsdAnchorOptions) -> np.ndarray:
    """Anchors as an (N, 4) float32 array of (x_center, y_center, w, h), normalised."""
    anchors: list[tuple[float, float, float, float]] = []
    layer = 0
    count = options.num_layers
    while layer < count:
        ratios: list[float] = []
        scales: list[float] = []
        last = layer
        while last < count and options.strides[last] == options.strides[layer]:
            scale = _scale(options, last, count)
            if last == 0 and options.reduce_boxes_in_lowest_layer:
                ratios += [1.0, 2.0, 0.5]
                scales += [0.1, scale, scale]
            else:
                for ratio in options.aspect_ratios:
                    ratios.append(ratio)
                    scales.append(scale)
                if options.interpolated_scale_aspect_ratio > 0.0:
                    following = 1.0 if last == count - 1 else _scale(options, last + 1, count)
                    scales.append(math.sqrt(scale * following))
                    ratios.append(options.interpolated_scale_aspect_ratio)
            last += 1
        sizes = [(s * math.sqrt(r), s / math.sqrt(r)) for s, r in zip(scales, ratios)]  # (w, h)
        stride = options.strides[layer]
        rows = math.ceil(options.input_size_height / stride)
        cols = math.ceil(options.input_size_width / stride)
        for y in range(rows):
            for x in range(cols):
                cx = (x + options.anchor_offset_x) / cols
                cy = (y + options.anchor_offset_y) / rows
                for w, h in sizes:
                    anchors.append((cx, cy, 1.0, 1.0) if options.fixed_anchor_size else (cx, cy, w, h))
        layer = last
    return np.asarray(anchors, dtype=np.float32)


# -- decoding -------------------------------------------------------------------------------
def decode_boxes(raw: np.ndarray, anchors: np.ndarray, options: BoxDecodeOptions) -> tuple[np.ndarray, np.ndarray]:
    """Raw regressors (N, num_coords) -> boxes (N, 4) as (x0, y0, x1, y1) and keypoints (N, K, 2), normalised."""
    raw = raw.reshape(anchors.shape[0], options.num_coords).astype(np.float32)
    o = options.box_coord_offset
    if options.reverse_output_order:
        x, y, w, h = raw[:, o], raw[:, o + 1], raw[:, o + 2], raw[:, o + 3]
    else:
        y, x, h, w = raw[:, o], raw[:, o + 1], raw[:, o + 2], raw[:, o + 3]
    ax, ay, aw, ah = anchors[:, 0], anchors[:, 1], anchors[:, 2], anchors[:, 3]
    cx = x / options.x_scale * aw + ax
    cy = y / options.y_scale * ah + ay
    if options.apply_exponential_on_box_size:
        w = np.exp(w / options.w_scale) * aw
        h = np.exp(h / options.h_scale) * ah
    else:
        w = w / options.w_scale * aw
        h = h / options.h_scale * ah
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    keypoints = np.zeros((anchors.shape[0], options.num_keypoints, 2), np.float32)
    for k in range(options.num_keypoints):
        start = options.keypoint_coord_offset + k * options.num_values_per_keypoint
        kx, ky = (raw[:, start], raw[:, start + 1]) if options.reverse_output_order else (raw[:, start + 1], raw[:, start])
        keypoints[:, k, 0] = kx / options.x_scale * aw + ax
        keypoints[:, k, 1] = ky / options.y_scale * ah + ay
    return boxes, keypoints


def decode_scores(raw: np.ndarray, options: BoxDecodeOptions) -> tuple[np.ndarray, np.ndarray]:
    """Raw class scores (N, C) -> (best score, best class) per anchor."""
    scores = raw.reshape(raw.shape[0] if raw.ndim > 1 else raw.size, -1).astype(np.float32)
    if options.score_clipping_thresh is not None:
        scores = np.clip(scores, -options.score_clipping_thresh, options.score_clipping_thresh)
    if options.sigmoid_score:
        scores = (1.0 / (1.0 + np.exp(-scores.astype(np.float64)))).astype(np.float32)
    classes = np.argmax(scores, axis=1)
    return scores[np.arange(scores.shape[0]), classes], classes


# -- non-maximum suppression ----------------------------------------------------------------
def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one (x0, y0, x1, y1) box with each of ``boxes`` (M, 4)."""
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda b: np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)  # noqa: E731
    union = area(box) + area(boxes) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, keypoints: np.ndarray, options: NmsOptions) -> list[tuple[np.ndarray, float, np.ndarray, int]]:
    """Suppress overlapping boxes; returns (box, score, keypoints, source index) best first.

    "weighted" blends each cluster's boxes and keypoints by score (the top box keeps its
    score), as MediaPipe's WEIGHTED algorithm; "hard" keeps the top box of each cluster.
    """
    if options.algorithm not in ("weighted", "hard"):
        raise ValueError(f"unknown NMS algorithm {options.algorithm!r}: use 'weighted' or 'hard'")
    remaining = np.argsort(-scores, kind="stable")
    kept = []
    while remaining.size and (options.max_detections is None or len(kept) < options.max_detections):
        top = remaining[0]
        overlap = iou(boxes[top], boxes[remaining]) > options.iou_threshold
        overlap[0] = True
        cluster = remaining[overlap]
        box, points = boxes[top], keypoints[top]
        if options.algorithm == "weighted":
            weights = scores[cluster][:, None]
            box = (boxes[cluster] * weights).sum(0) / weights.sum()
            points = (keypoints[cluster] * weights[:, :, None]).sum(0) / weights.sum()
        kept.append((box, float(scores[top]), points, int(top)))
        remaining = remaining[~overlap]
    return kept


# -- whole results --------------------------------------------------------------------------
def _identity(xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return xs, ys


def _result(found: Sequence[tuple[np.ndarray, float, np.ndarray, int]], labels: Sequence[str],
            to_original: PointMapper, image_size: tuple[int, int]) -> Detections:
    detections = []
    for box, score, points, index in found:
        xs, ys = to_original(np.asarray([box[0], box[2]], np.float64), np.asarray([box[1], box[3]], np.float64))
        px, py = to_original(np.asarray(points[:, 0], np.float64), np.asarray(points[:, 1], np.float64))
        detections.append(Detection(
            box=(float(xs[0]), float(ys[0]), float(xs[1]), float(ys[1])),
            score=score,
            label=labels[index] if index < len(labels) else "",
            index=index,
            keypoints=tuple((float(x), float(y)) for x, y in zip(px, py)),
        ))
    return Detections(tuple(detections), image_size)


def detect(
    outputs: Sequence[np.ndarray],
    specs: Sequence[TensorSpec],
    options: Postprocess,
    labels: Sequence[str] = (),
    to_original: PointMapper = _identity,
    image_size: tuple[int, int] = (0, 0),
    anchors: np.ndarray | None = None,
) -> Detections:
    """Detections from a detector's raw outputs, as ``options.kind`` says."""
    if options.kind == "ssd_anchors":
        if options.anchors is None or options.decode is None:
            raise ValueError("ssd_anchors post-processing needs anchors and decode options")
        decode = options.decode
        if anchors is None:
            anchors = generate_anchors(options.anchors)
        raw_boxes = dequantize(outputs[decode.box_output], specs[decode.box_output])
        raw_scores = dequantize(outputs[decode.score_output], specs[decode.score_output])
        boxes, keypoints = decode_boxes(raw_boxes, anchors, decode)
        scores, classes = decode_scores(raw_scores.reshape(anchors.shape[0], -1), decode)
        keep = scores >= options.min_score
        found = nms(boxes[keep], scores[keep], keypoints[keep], options.nms or NmsOptions())
        classes = classes[keep]
        found = [(b, s, k, int(classes[i])) for b, s, k, i in found]
    elif options.kind == "detection_postprocess":
        roles = options.detection_outputs
        if roles is None:
            raise ValueError("detection_postprocess post-processing needs detection_outputs")
        raw = dequantize(outputs[roles.boxes], specs[roles.boxes]).reshape(-1, 4)
        classes = dequantize(outputs[roles.classes], specs[roles.classes]).reshape(-1)
        scores = dequantize(outputs[roles.scores], specs[roles.scores]).reshape(-1)
        count = min(int(dequantize(outputs[roles.count], specs[roles.count]).reshape(-1)[0]), raw.shape[0])
        boxes = raw[:count][:, [1, 0, 3, 2]]  # (ymin, xmin, ymax, xmax) -> (x0, y0, x1, y1)
        order = [i for i in np.argsort(-scores[:count], kind="stable") if scores[i] >= options.min_score]
        found = [(boxes[i], float(scores[i]), np.zeros((0, 2), np.float32), int(classes[i])) for i in order]
    else:
        raise ValueError(f"post-processing {options.kind!r} does not detect objects")
    return _result(found, labels, to_original, image_size)
