"""Every way a bundle can be wrong is refused with a clear edgeq error, before native code loads."""
from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import edgeq
from conftest import shared_path
from edgeq.bundle import MANIFEST_NAME, read_bundle, write_bundle
from edgeq.manifest import FORMAT_VERSION
from edgeq.tflite_builder import TFLiteBuilder

RESNET = "mlperf_tiny_resnet_cifar10_int8.tflite"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    model = shared_path("models", "tflite", RESNET)
    out = tmp_path_factory.mktemp("bundle") / "resnet.edgeq"
    return edgeq.package(model, out).path


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a bundle, letting ``edit(name, data)`` change or drop (None) members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
    return dst


def _edit_manifest(src: Path, dst: Path, change) -> Path:
    def edit(name, data):
        if name != MANIFEST_NAME:
            return data
        manifest = json.loads(data)
        change(manifest)
        return json.dumps(manifest)

    return _rewrite(src, dst, edit)


def test_good_bundle_loads_and_runs(bundle):
    predictor = edgeq.load(bundle)
    spec = predictor.manifest.inputs[0]
    (out,) = predictor.run(np.zeros(spec.shape, spec.dtype))
    assert out.shape == (1, 10) and out.dtype == np.int8


def test_tampered_byte_is_refused(bundle, tmp_path):
    data = bytearray(bundle.read_bytes())
    with zipfile.ZipFile(bundle) as archive:
        info = archive.getinfo("model/library.so")
    middle = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    data[middle] ^= 0xFF
    tampered = tmp_path / "tampered.edgeq"
    tampered.write_bytes(bytes(data))
    with pytest.raises(edgeq.BundleFormatError, match="corrupt|tampered"):
        edgeq.load(tampered)


def test_library_replaced_with_matching_zip_crc_is_refused_by_sha256(bundle, tmp_path):
    def flip_last_byte(name, data):
        return data[:-1] + bytes([data[-1] ^ 0xFF]) if name == "model/library.so" else data

    forged = _rewrite(bundle, tmp_path / "forged.edgeq", flip_last_byte)
    with pytest.raises(edgeq.BundleFormatError, match="model/library.so does not match its sha256"):
        edgeq.load(forged)


def test_truncated_file_is_refused(bundle, tmp_path):
    truncated = tmp_path / "truncated.edgeq"
    truncated.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
    with pytest.raises(edgeq.BundleFormatError, match="truncated"):
        edgeq.load(truncated)


def test_wrong_architecture_is_refused(bundle, tmp_path):
    def to_aarch64(manifest):
        manifest["target"].update(arch="aarch64", device="rpi4")

    foreign = _edit_manifest(bundle, tmp_path / "arm.edgeq", to_aarch64)
    with pytest.raises(edgeq.ArchitectureMismatchError, match="compiled for aarch64.*this machine is x86_64"):
        edgeq.load(foreign)


def test_missing_cpu_feature_is_refused(bundle, tmp_path):
    def needs_feature(manifest):
        manifest["target"]["cpu_features"] = ["avx2", "imaginary_feature"]

    odd = _edit_manifest(bundle, tmp_path / "odd.edgeq", needs_feature)
    with pytest.raises(edgeq.ArchitectureMismatchError, match="imaginary_feature"):
        edgeq.load(odd)


def test_newer_format_version_is_refused(bundle, tmp_path):
    def newer(manifest):
        manifest["format_version"] = FORMAT_VERSION + 1

    future = _edit_manifest(bundle, tmp_path / "future.edgeq", newer)
    with pytest.raises(edgeq.BundleFormatError, match=f"format {FORMAT_VERSION + 1} is newer.*upgrade edgeq"):
        edgeq.load(future)


@pytest.mark.parametrize("color", ["bgr", "cmyk"])
def test_colour_order_the_format_cannot_hold_is_refused(bundle, tmp_path, color):
    """A format-1 bundle claiming BGR (a format-2 feature an older edgeq would read as RGB) is refused."""
    assert json.loads(zipfile.ZipFile(bundle).read(MANIFEST_NAME))["format_version"] == 1

    def recolour(manifest):
        manifest["preprocess"]["color"] = color

    odd = _edit_manifest(bundle, tmp_path / f"{color}.edgeq", recolour)
    with pytest.raises(edgeq.BundleFormatError, match=f"cannot hold the colour order '{color}'"):
        edgeq.load(odd)


@pytest.mark.parametrize("member", ["../evil.so", "/etc/evil.so", "model/../../evil.so"])
def test_path_traversal_member_is_refused(bundle, tmp_path, member):
    evil = tmp_path / "evil.edgeq"
    shutil.copy(bundle, evil)
    with zipfile.ZipFile(evil, "a") as archive:
        archive.writestr(member, b"payload")
    with pytest.raises(edgeq.BundleFormatError, match="unsafe path"):
        edgeq.load(evil)
    assert not (tmp_path.parent / "evil.so").exists()


def test_unlisted_member_is_refused(bundle, tmp_path):
    extra = tmp_path / "extra.edgeq"
    shutil.copy(bundle, extra)
    with zipfile.ZipFile(extra, "a") as archive:
        archive.writestr("model/extra.so", b"payload")
    with pytest.raises(edgeq.BundleFormatError, match="does not list"):
        edgeq.load(extra)


def test_writer_refuses_unsafe_names(bundle, tmp_path):
    manifest = read_bundle(bundle).manifest
    with pytest.raises(edgeq.BundleFormatError, match="unsafe path"):
        write_bundle(tmp_path / "x.edgeq", manifest, {"../x": b""})


def test_model_file_given_as_bundle_gets_a_hint():
    model = shared_path("models", "tflite", RESNET)
    with pytest.raises(edgeq.BundleFormatError, match="looks like a model: package it first"):
        edgeq.load(model)


def test_non_model_input_is_refused(tmp_path):
    picture = shared_path("data", "cifar10-samples", "cifar10_00_3.png")
    with pytest.raises(edgeq.UnsupportedModelError, match="not a TFLite model"):
        edgeq.package(picture, tmp_path / "x.edgeq")
    with pytest.raises(edgeq.UnsupportedModelError, match="no such model file"):
        edgeq.package(tmp_path / "missing.tflite", tmp_path / "x.edgeq")


def test_unsupported_ops_are_all_named(tmp_path):
    builder = TFLiteBuilder()
    x = builder.input((1, 8), "float32")
    index = builder.constant(np.zeros(2, np.int32))
    y = builder.tensor((1, 8), "float32")
    builder.op("DYNAMIC_UPDATE_SLICE", [x, x, index], [y])
    z = builder.tensor((1, 8), "float32")
    builder.op("REDUCE_WINDOW", [y], [z])
    builder.output(z)
    model = tmp_path / "unsupported.tflite"
    model.write_bytes(builder.build())
    with pytest.raises(edgeq.UnsupportedModelError) as error:
        edgeq.package(model, tmp_path / "x.edgeq")
    assert "DYNAMIC_UPDATE_SLICE" in str(error.value) and "REDUCE_WINDOW" in str(error.value)
    assert not (tmp_path / "x.edgeq").exists()


def test_unknown_and_unsupported_devices(tmp_path):
    model = shared_path("models", "tflite", RESNET)
    with pytest.raises(edgeq.UnknownDeviceError, match="unknown device 'rpi9'.*rpi4"):
        edgeq.package(model, tmp_path / "x.edgeq", edgeq.PackageOptions(device="rpi9"))
    with pytest.raises(edgeq.UnknownDeviceError, match="no 32-bit ARM runtime.*64-bit OS"):
        edgeq.package(model, tmp_path / "x.edgeq", edgeq.PackageOptions(device="armv7"))


def test_unreadable_picture_is_refused(bundle, tmp_path):
    predictor = edgeq.load(bundle)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not a picture at all")
    with pytest.raises(edgeq.InputError, match="not a readable picture"):
        predictor.predict(junk)
    with pytest.raises(edgeq.InputError, match="no such picture"):
        predictor.predict(tmp_path / "missing.png")
    with pytest.raises(edgeq.InputError, match=r"must be int8\[1, 32, 32, 3\]"):
        predictor.run(np.zeros((1, 32, 32, 3), np.float32))


@pytest.mark.parametrize("threads", [1, 2])
def test_num_threads_sizes_the_runtime_pool(bundle, threads):
    import subprocess
    import sys

    code = f"import edgeq; p = edgeq.load({str(bundle)!r}, num_threads={threads}); print(p._vm.num_threads())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(threads)


def test_quantized_pad_goes_through_the_integer_importer(tmp_path):
    """TVM's stock importer refuses quantized PAD; edgeq's integer importer lowers it."""
    from edgeq.reference import run_reference
    from edgeq.tflite_builder import Q

    builder = TFLiteBuilder()
    x = builder.input((1, 6, 6, 4), "int8", Q(0.05, 3))
    padded = builder.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
    weights = builder.constant(np.random.default_rng(0).integers(-127, 128, (2, 3, 3, 4), dtype=np.int8), Q([0.01, 0.02], 0, axis=0))
    bias = builder.constant(np.array([40, -40], np.int32), Q([0.05 * 0.01, 0.05 * 0.02], 0))
    y = builder.conv2d(padded, weights, bias, Q(0.1, -2), padding="VALID")
    builder.output(y)
    model = tmp_path / "pad.tflite"
    model.write_bytes(builder.build())
    result = edgeq.package(model, tmp_path / "pad.edgeq")
    assert result.manifest.compile_report["importer"] == "edgeq-integer"
    tensor = np.random.default_rng(1).integers(-128, 128, (1, 6, 6, 4), dtype=np.int8)
    (ours,) = edgeq.load(result.path).run(tensor)
    (theirs,) = run_reference(model, tensor)
    assert np.array_equal(ours, theirs)
