"""Detection end to end: SSD anchors, decoding, NMS, letterbox mapping, the BlazeFace bundle, --draw."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgeq
from conftest import REPO_ROOT, shared_path
from edgeq.cli import build_parser
from edgeq.detection import (
    Detections,
    decode_boxes,
    decode_scores,
    detect,
    generate_anchors,
    iou,
    nms,
)
from edgeq.manifest import (
    BoxDecodeOptions,
    DetectionOutputs,
    Manifest,
    NmsOptions,
    Postprocess,
    Preprocess,
    TensorSpec,
)
from edgeq.packager import _postprocess, blazeface_short_range, default_postprocess, read_postprocess
from edgeq.preprocess import fit_picture, picture_to_tensor_mapped

MODEL = ("models", "tflite", "mediapipe_face_detection_short_range_float.tflite")
CAMERAMAN = ("data", "faces", "cameraman.png")
CAMERAMAN_FACE = (178, 122, 265, 209)  # the face in cameraman.png (x0, y0, x1, y1), checked by eye


def box_iou(a, b) -> float:
    return float(iou(np.asarray(a, np.float64), np.asarray([b], np.float64))[0])


# -- anchors, decoding and NMS: exact numbers ----------------------------------------------------
def test_short_range_anchors_match_mediapipe_layout():
    anchors = generate_anchors(blazeface_short_range().anchors)
    assert anchors.shape == (896, 4)
    # 16x16 cells of stride 8 with 2 anchors each, then 8x8 cells of stride 16 with 6 each.
    np.testing.assert_allclose(anchors[0], [0.5 / 16, 0.5 / 16, 1, 1])
    np.testing.assert_allclose(anchors[1], anchors[0])
    np.testing.assert_allclose(anchors[2], [1.5 / 16, 0.5 / 16, 1, 1])
    np.testing.assert_allclose(anchors[511], [15.5 / 16, 15.5 / 16, 1, 1])
    np.testing.assert_allclose(anchors[512:518], [[0.5 / 8, 0.5 / 8, 1, 1]] * 6)
    np.testing.assert_allclose(anchors[518], [1.5 / 8, 0.5 / 8, 1, 1])
    np.testing.assert_allclose(anchors[-1], [7.5 / 8, 7.5 / 8, 1, 1])


def test_anchor_sizes_without_fixed_size():
    options = replace(blazeface_short_range().anchors, fixed_anchor_size=False)
    anchors = generate_anchors(options)
    s0, s1 = 0.1484375, 0.1484375 + (0.75 - 0.1484375) / 3
    np.testing.assert_allclose(anchors[0, 2:], [s0, s0], rtol=1e-6)
    np.testing.assert_allclose(anchors[1, 2:], [np.sqrt(s0 * s1)] * 2, rtol=1e-6)
    np.testing.assert_allclose(anchors[512 + 5, 2:], [np.sqrt(0.75 * 1.0)] * 2, rtol=1e-6)  # last layer


def test_decode_boxes_keypoints_and_scores():
    options = BoxDecodeOptions(box_output=0, score_output=1, num_coords=8, num_keypoints=2,
                               x_scale=100, y_scale=100, w_scale=100, h_scale=100, score_clipping_thresh=10)
    anchors = np.asarray([[0.5, 0.5, 1.0, 1.0], [0.25, 0.75, 0.5, 0.5]], np.float32)
    raw = np.asarray([[10, -20, 40, 20, 0, 0, 5, 5], [0, 0, 100, 100, -50, 50, 0, 0]], np.float32)
    boxes, keypoints = decode_boxes(raw, anchors, options)
    np.testing.assert_allclose(boxes, [[0.4, 0.2, 0.8, 0.4], [0.0, 0.5, 0.5, 1.0]], atol=1e-6)
    np.testing.assert_allclose(keypoints, [[[0.5, 0.5], [0.55, 0.55]], [[0.0, 1.0], [0.25, 0.75]]], atol=1e-6)
    scores, classes = decode_scores(np.asarray([[0.0], [1000.0]], np.float32), options)
    np.testing.assert_allclose(scores, [0.5, 1 / (1 + np.exp(-10))], rtol=1e-6)
    assert classes.tolist() == [0, 0]


def test_weighted_and_hard_nms():
    boxes = np.asarray([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 10.5]], np.float32)
    scores = np.asarray([0.9, 0.6, 0.8, 0.3], np.float32)
    keypoints = boxes[:, None, :2].copy()
    hard = nms(boxes, scores, keypoints, NmsOptions("hard", 0.3))
    assert [(k[3], k[1]) for k in hard] == [(0, pytest.approx(0.9)), (2, pytest.approx(0.8))]
    np.testing.assert_allclose(hard[0][0], [0, 0, 10, 10])
    weighted = nms(boxes, scores, keypoints, NmsOptions("weighted", 0.3))
    assert [k[3] for k in weighted] == [0, 2]
    # cluster of 0, 1 and 3 blended by score: x1 = (9 + 6.6 + 3) / 1.8, y1 = (9 + 6 + 3.15) / 1.8
    np.testing.assert_allclose(weighted[0][0], [0.6 / 1.8, 0, 18.6 / 1.8, 18.15 / 1.8], rtol=1e-6)
    np.testing.assert_allclose(weighted[0][2], [[0.6 / 1.8, 0]], atol=1e-6)
    assert weighted[0][1] == pytest.approx(0.9)
    assert len(nms(boxes, scores, keypoints, NmsOptions("hard", 0.3, max_detections=1))) == 1


def test_detection_postprocess_outputs():
    specs = (TensorSpec("boxes", (1, 3, 4), "float32"), TensorSpec("classes", (1, 3), "float32"),
             TensorSpec("scores", (1, 3), "float32"), TensorSpec("count", (1,), "float32"))
    outputs = [np.asarray([[[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0, 0, 0, 0]]], np.float32),
               np.asarray([[3, 1, 0]], np.float32), np.asarray([[0.4, 0.9, 0.0]], np.float32),
               np.asarray([2], np.float32)]
    post = Postprocess(kind="detection_postprocess", min_score=0.3, detection_outputs=DetectionOutputs())
    result = detect(outputs, specs, post, ("a", "b", "c", "d"), lambda x, y: (x * 200, y * 100), (200, 100))
    assert [(d.label, d.score) for d in result] == [("b", pytest.approx(0.9)), ("d", pytest.approx(0.4))]
    np.testing.assert_allclose(result[1].box, [40, 10, 120, 50], rtol=1e-6)


# -- letterbox and coordinate mapping: exact numbers ----------------------------------------------
def test_letterbox_mapping_is_exact():
    picture = Image.new("RGB", (200, 100), (255, 255, 255))
    fitted, mapping = fit_picture(picture, 128, 128, Preprocess(letterbox=True, letterbox_fill=7))
    assert fitted.size == (128, 128)
    # 200x100 scales by 0.64 to 128x64, centred: 32 padding rows above and below.
    pixels = np.asarray(fitted)
    assert (pixels[:32] == 7).all() and (pixels[96:] == 7).all() and (pixels[32:96] == 255).all()
    assert (mapping.scale_x, mapping.scale_y, mapping.offset_x, mapping.offset_y) == (1.5625, 1.5625, 0.0, -50.0)
    xs, ys = mapping.to_original(np.asarray([0, 64, 128]), np.asarray([32, 64, 96]))
    assert xs.tolist() == [0, 100, 200] and ys.tolist() == [0, 50, 100]
    xs, ys = mapping.normalized_to_original(np.asarray([0.5]), np.asarray([0.25]))
    assert (xs[0], ys[0]) == (100.0, 0.0)
    # portrait: 90x300 into 64x128 (w x h): ratio min(64/90, 128/300) -> 38x128, 13 columns left
    _, mapping = fit_picture(Image.new("L", (90, 300)), 128, 64, Preprocess(letterbox=True))
    assert mapping.offset_x == pytest.approx(-13 * 90 / 38) and mapping.scale_y == pytest.approx(300 / 128)
    assert mapping.to_original(np.asarray([51.0]), np.asarray([128.0]))[0][0] == pytest.approx(90.0)


def test_stretch_and_center_crop_mapping():
    _, mapping = fit_picture(Image.new("RGB", (300, 150)), 100, 100, Preprocess())
    assert (mapping.scale_x, mapping.scale_y, mapping.offset_x, mapping.offset_y) == (3.0, 1.5, 0.0, 0.0)
    _, mapping = fit_picture(Image.new("RGB", (300, 150)), 100, 100, Preprocess(center_crop=0.8))
    # a 120x120 square cut at (90, 15), resized to 100x100
    assert (mapping.scale_x, mapping.scale_y, mapping.offset_x, mapping.offset_y) == (1.2, 1.2, 90.0, 15.0)


def test_letterboxed_point_lands_where_drawn():
    """A bright dot in a wide picture ends up where the mapping says, in the model input."""
    picture = np.zeros((90, 300, 3), np.uint8)
    picture[40:50, 200:210] = 255
    spec = TensorSpec("input", (1, 128, 128, 3), "uint8", "NHWC")
    tensor, mapping = picture_to_tensor_mapped(picture, spec, Preprocess(letterbox=True, raw_pixels=True))
    ys, xs = np.nonzero(tensor[0, :, :, 0] > 128)
    cx, cy = mapping.to_original(np.asarray([xs.mean() + 0.5]), np.asarray([ys.mean() + 0.5]))
    assert abs(cx[0] - 205) < 1.5 and abs(cy[0] - 45) < 1.5


# -- the manifest and the packager ----------------------------------------------------------------
def test_default_postprocess_recognises_blazeface():
    from edgeq.tflite_model import read_tflite

    model = read_tflite(shared_path(*MODEL))
    post = default_postprocess(model)
    assert post == blazeface_short_range(0, 1)
    raw = replace(model, outputs=model.outputs + model.outputs[:1], output_producers=("CUSTOM",) * 3)
    assert default_postprocess(raw).kind == "raw"
    ssd = replace(model, ops=model.ops + ("CUSTOM",), output_producers=("CUSTOM",) * 4, outputs=(
        TensorSpec("boxes", (1, 10, 4), "float32"), TensorSpec("classes", (1, 10), "float32"),
        TensorSpec("scores", (1, 10), "float32"), TensorSpec("count", (1,), "float32")))
    assert default_postprocess(ssd).detection_outputs == DetectionOutputs(0, 1, 2, 3)


def test_postprocess_file_and_cli_options(tmp_path):
    from edgeq.tflite_model import read_tflite

    model = read_tflite(shared_path(*MODEL))
    path = tmp_path / "post.json"
    path.write_text(json.dumps({"min_score": 0.7, "nms": {"algorithm": "hard", "iou_threshold": 0.4}}))
    post = _postprocess(model, read_postprocess(path))
    assert post.min_score == 0.7 and post.nms == NmsOptions("hard", 0.4) and post.anchors.num_layers == 4
    full = json.loads(json.dumps(asdict(blazeface_short_range())))
    assert Postprocess.from_dict(full) == blazeface_short_range()
    args = build_parser().parse_args(["package", "m.tflite", "--letterbox", "--postprocess", str(path)])
    assert args.letterbox and args.postprocess == path
    args = build_parser().parse_args(["predict", "b.edgeq", "x.png", "--draw", "out.png", "--json"])
    assert args.draw == Path("out.png")
    with pytest.raises(edgeq.EdgeqError, match="anchors"):
        _postprocess(replace(model, outputs=model.outputs[:1]), {"kind": "ssd_anchors"})


# -- the BlazeFace bundle ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def face_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faces") / "faces.edgeq"
    options = edgeq.PackageOptions(device="x86_64", preprocess={"letterbox": True},
                                   compile=edgeq.CompileOptions(default_schedules=False))
    edgeq.package(shared_path(*MODEL), out, options)
    return out


@pytest.fixture(scope="module")
def predictor(face_bundle):
    return edgeq.load(face_bundle)


@pytest.fixture(scope="module")
def reference():
    from edgeq.reference import ReferenceInterpreter

    return ReferenceInterpreter(shared_path(*MODEL))


def reference_detections(predictor, reference, image) -> Detections:
    manifest = predictor.manifest
    tensor, mapping = picture_to_tensor_mapped(image, manifest.inputs[0], manifest.preprocess)
    return detect(reference.run(tensor), manifest.outputs, manifest.postprocess, manifest.labels,
                  mapping.normalized_to_original, mapping.image_size)


def assert_same_detections(found: Detections, expected: Detections) -> None:
    assert len(found) == len(expected) > 0
    for detection in expected:
        assert max(box_iou(detection.box, other.box) for other in found) >= 0.9


def test_manifest_records_detection_and_old_manifests_load(predictor):
    manifest = predictor.manifest
    assert manifest.postprocess.kind == "ssd_anchors" and manifest.preprocess.letterbox
    data = json.loads(json.dumps(manifest.to_dict()))
    assert Manifest.from_dict(data) == manifest
    for key in ("min_score", "anchors", "decode", "nms", "detection_outputs"):
        del data["postprocess"][key]
    for key in ("letterbox", "letterbox_fill"):
        del data["preprocess"][key]
    old = Manifest.from_dict(data)
    assert old.postprocess.anchors is None and old.preprocess.letterbox is False


def test_cameraman_face_agrees_with_reference(predictor, reference):
    picture = shared_path(*CAMERAMAN)
    found = predictor.predict(picture)
    assert isinstance(found, Detections) and found.image_size == (512, 512)
    assert_same_detections(found, reference_detections(predictor, reference, picture))
    assert len(found) == 1 and box_iou(found[0].box, CAMERAMAN_FACE) >= 0.9
    assert (found[0].label, found[0].index) == ("face", 0) and found[0].score > 0.7
    assert len(found[0].keypoints) == 6
    assert all(CAMERAMAN_FACE[0] <= x <= CAMERAMAN_FACE[2] and CAMERAMAN_FACE[1] <= y <= CAMERAMAN_FACE[3]
               for x, y in found[0].keypoints)


def two_faces(margin: float, scale: float, canvas: tuple[int, int]) -> tuple[Image.Image, list[tuple[float, ...]]]:
    """Cameraman's face (with ``margin`` of context) pasted twice on a grey canvas; known boxes."""
    x0, y0, x1, y1 = CAMERAMAN_FACE
    w, h = x1 - x0, y1 - y0
    crop = (round(x0 - margin * w), round(y0 - margin * h), round(x1 + margin * w), round(y1 + margin * h))
    patch = Image.open(shared_path(*CAMERAMAN)).convert("RGB").crop(crop)
    patch = patch.resize((round(patch.width * scale), round(patch.height * scale)))
    k = patch.width / (crop[2] - crop[0])
    picture = Image.new("RGB", canvas, (200, 200, 200))
    top = (canvas[1] - patch.height) // 2
    boxes = []
    for left in (10, canvas[0] - patch.width - 10):
        picture.paste(patch, (left, top))
        boxes.append(tuple((CAMERAMAN_FACE[i] - crop[i % 2]) * k + (left, top)[i % 2] for i in range(4)))
    return picture, boxes


def assert_found_where_placed(found, known) -> None:
    """One detection per known box, each edge within 10% of the box's size."""
    assert len(found) == len(known)
    for box in known:
        match = max(found, key=lambda d: box_iou(d.box, box))
        width, height = box[2] - box[0], box[3] - box[1]
        errors = [abs(match.box[i] - box[i]) / (width if i % 2 == 0 else height) for i in range(4)]
        assert max(errors) <= 0.10, (match.box, box)


@pytest.mark.parametrize("margin, scale, canvas", [(0.4, 1.0, (512, 256)), (0.4, 1.5, (768, 384))])
def test_two_pasted_faces_are_found_where_placed(predictor, reference, margin, scale, canvas):
    picture, known = two_faces(margin, scale, canvas)
    found = predictor.predict(picture)
    assert_same_detections(found, reference_detections(predictor, reference, picture))
    assert_found_where_placed(found, known)


# -- the int8 BlazeFace made by edgeq's own quantization ----------------------------------------------
def _calibration_pictures(folder: Path) -> Path:
    """160 calibration pictures without the test's face: the 20 ImageNet samples, mirrored and
    cropped, and each with two LFW faces (25x25, upscaled) pasted at random places, two draws."""
    from PIL import ImageOps

    faces = np.load(shared_path("data", "faces", "lfw_subset_25x25.npy"))[:100]
    backgrounds = sorted(shared_path("data", "imagenet-samples").iterdir())
    for draw, seed in enumerate((0, 5)):
        rng = np.random.default_rng(seed)
        for k, path in enumerate(backgrounds):
            picture = Image.open(path).convert("RGB")
            w, h = picture.size
            variants = [picture, ImageOps.mirror(picture), picture.crop((w // 8, h // 8, w - w // 8, h - h // 8))]
            canvas = picture.copy()
            for f in range(2):
                face = Image.fromarray((faces[(2 * k + f) % 100] * 255).astype(np.uint8)).convert("RGB")
                size = int(rng.integers(w // 8, w // 3))
                face = face.resize((size, size), Image.BICUBIC)
                canvas.paste(face, (int(rng.integers(0, w - size)), int(rng.integers(0, h - size))))
            for j, variant in enumerate(variants + [canvas]):
                variant.save(folder / f"{draw}_{path.stem}_{j}.png")
    return folder


@pytest.fixture(scope="module")
def int8_predictor(tmp_path_factory):
    """The face detector quantized by ``edgeq package --quantize int8 --calibration-method percentile``."""
    from edgeq.quantization import QuantConfig

    folder = _calibration_pictures(tmp_path_factory.mktemp("face_calibration"))
    out = tmp_path_factory.mktemp("faces_int8") / "faces_int8.edgeq"
    options = edgeq.PackageOptions(
        device="x86_64", preprocess={"letterbox": True}, quantize=QuantConfig(method="percentile", samples=160),
        calibration=folder, compile=edgeq.CompileOptions(default_schedules=False),
    )
    result = edgeq.package(shared_path(*MODEL), out, options)
    assert result.manifest.compile_report["importer"] == "edgeq-integer"
    assert result.manifest.compile_report["quantization"]["samples"] == 160
    return edgeq.load(out)


def test_int8_outputs_keep_one_scale_per_head(int8_predictor):
    """The score heads (16x16 and 8x8 anchors) are dequantized separately before the float
    RESHAPE/CONCATENATION tail: one shared scale would be ~1.07 (the 8x8 head reaches -270),
    putting every logit in (-0.53, 0.53) on 0, i.e. score 0.5, and so a false face."""
    layers = {layer["tensor"]: layer for layer in int8_predictor.manifest.compile_report["quantization"]["layers"]}
    assert layers["classificators"]["scale"] is None and layers["regressors"]["scale"] is None  # float tail
    assert layers["classificator_8"]["scale"] < 0.05 < layers["classificator_16"]["scale"]


def test_int8_cameraman_face_agrees_with_float_reference(int8_predictor, predictor, reference):
    picture = shared_path(*CAMERAMAN)
    found = int8_predictor.predict(picture)
    expected = reference_detections(predictor, reference, picture)  # the float model, TFLite reference
    assert_same_detections(found, expected)
    assert len(found) == 1 and box_iou(found[0].box, CAMERAMAN_FACE) >= 0.9
    assert abs(found[0].score - expected[0].score) < 0.05


@pytest.mark.parametrize("margin, scale, canvas", [(0.4, 1.0, (512, 256)), (0.4, 1.5, (768, 384))])
def test_int8_two_pasted_faces_are_found_where_placed(int8_predictor, predictor, reference, margin, scale, canvas):
    picture, known = two_faces(margin, scale, canvas)
    found = int8_predictor.predict(picture)
    assert_same_detections(found, reference_detections(predictor, reference, picture))
    assert_found_where_placed(found, known)


def test_cli_draws_boxes_on_the_original(face_bundle, tmp_path):
    out = tmp_path / "drawn.png"
    picture = shared_path(*CAMERAMAN)
    result = subprocess.run(
        [sys.executable, "-m", "edgeq.cli", "predict", str(face_bundle), str(picture), "--draw", str(out), "--json"],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout.splitlines()[-1])
    assert len(line["detections"]) == 1 and len(line["detections"][0]["keypoints"]) == 6
    drawn = Image.open(out)
    assert drawn.size == Image.open(picture).size
    pixels = np.asarray(drawn.convert("RGB")).astype(int)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    x0, y0, x1, y1 = (round(v) for v in line["detections"][0]["box"])
    band = 3  # the line's width lies inside the box; allow for rounding either way
    edges = (red[y0 - 1:y0 + band, x0 + 5:x1 - 5].any(0), red[y1 - band:y1 + 1, x0 + 5:x1 - 5].any(0),
             red[y0 + 5:y1 - 5, x0 - 1:x0 + band].any(1), red[y0 + 5:y1 - 5, x1 - band:x1 + 1].any(1))
    for edge in edges:
        assert edge.mean() > 0.9
    assert not red[y0 + 20:y1 - band - 2, x0 + band + 2:x1 - band - 2].any()  # below the score text: clear
    assert red.sum() < red.size * 0.05  # only the box (and its score text) is red
