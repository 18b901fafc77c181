"""The `edgeq` command end to end on the project's own demo model, and its error handling."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from edgeq.cli import main

_spec = importlib.util.spec_from_file_location("make_colour_model", REPO_ROOT / "examples" / "make_colour_model.py")
make_colour_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_colour_model)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo")
    make_colour_model.main(str(folder))
    return folder


@pytest.fixture(scope="module")
def demo_bundle(demo) -> Path:
    bundle = demo / "colours.edgeq"
    assert main(["package", str(demo / "colours.tflite"), "--device", "x86_64", "-o", str(bundle)]) == 0
    return bundle


def test_package_shows_progress_and_integer_summary(demo, tmp_path, capsys):
    assert main(["package", str(demo / "colours.tflite"), "-o", str(tmp_path / "c.edgeq"), "--report", "json"]) == 0
    captured = capsys.readouterr()
    assert "importing the model" in captured.err and "compiling for x86_64" in captured.err
    report = json.loads(captured.out[: captured.out.rindex("}") + 1])
    assert report["importer"] == "edgeq-integer"
    assert report["integer"]["macs_integer"] == report["integer"]["macs_total"] > 0


def test_predict_names_the_dominant_colour(demo, demo_bundle, capsys):
    pictures = [str(demo / f"{label}.png") for label in make_colour_model.LABELS]
    assert main(["predict", str(demo_bundle), *pictures, "--json", "--top-k", "1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["classes"][0]["label"] for line in lines] == list(make_colour_model.LABELS)


def test_inspect_shows_manifest(demo_bundle, capsys):
    assert main(["inspect", str(demo_bundle)]) == 0
    out = capsys.readouterr().out
    assert "input        image: int8[1, 32, 32, 3] NHWC  scale 1 zero_point -128" in out
    assert "labels       3 (red, green, blue" in out
    assert "runtime/libtvm_runtime.so" in out
    assert main(["inspect", str(demo_bundle), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["format_version"] == 1 and manifest["target"]["device"] == "x86_64"


def test_devices_lists_the_registry(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    for name in ("x86_64", "x86_64-avx2", "rpi4", "rpi5", "jetson-orin-nano", "cuda-sm90"):
        assert f"\n{name} " in "\n" + out


def test_errors_are_one_line_messages_with_exit_1(demo, tmp_path, capsys):
    assert main(["predict", str(demo / "colours.tflite"), str(demo / "red.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("edgeq: error:") and "package it first" in err and "Traceback" not in err
    assert main(["package", str(demo / "colours.tflite"), "--device", "nope", "-o", str(tmp_path / "x.edgeq")]) == 1
    assert "unknown device 'nope'" in capsys.readouterr().err
