"""The scripts in examples/ run as their docstrings say.

classify.py and remote_test.py use the demo colour model (built by examples/make_colour_model.py);
remote_test.py talks to a real `edgeq serve` on 127.0.0.1 (port chosen by the system), killed at
the end; detect_faces.py uses the shared BlazeFace model.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgeq
from conftest import REPO_ROOT, shared_path
from edgeq.cli import main

EXAMPLES = REPO_ROOT / "examples"
FACE_MODEL = ("models", "tflite", "mediapipe_face_detection_short_range_float.tflite")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    values = dict(os.environ)
    values["EDGEQ_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    values.pop("EDGEQ_RPC_TOKEN", None)
    return values


def example(name: str, *args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, env) -> Path:
    """The demo colour model and pictures, packaged once."""
    folder = tmp_path_factory.mktemp("demo")
    made = example("make_colour_model.py", str(folder), env=env)
    assert made.returncode == 0, made.stderr
    edgeq.package(folder / "colours.tflite", folder / "colours.edgeq", edgeq.PackageOptions(device="x86_64"))
    return folder


def test_classify(demo, env):
    proc = example("classify.py", str(demo / "colours.edgeq"), str(demo / "red.png"), str(demo / "blue.png"), env=env)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if not line.startswith(" ")]
    assert lines[0].startswith(f"{demo / 'red.png'}: red (") and lines[1].startswith(f"{demo / 'blue.png'}: blue (")


def test_examples_print_their_usage(env):
    for name in ("classify.py", "detect_faces.py", "remote_test.py"):
        proc = example(name, env=env)
        assert proc.returncode == 2 and "python examples/" in proc.stderr


def test_detect_faces(tmp_path, env):
    bundle = tmp_path / "faces.edgeq"
    post = tmp_path / "post.json"
    post.write_text(json.dumps({"min_score": 0.6}))
    # as the docstring says (plus --postprocess, and --no-schedules to keep the test short)
    assert main(["package", str(shared_path(*FACE_MODEL)), "--letterbox", "--postprocess", str(post),
                 "--no-schedules", "-o", str(bundle)]) == 0
    manifest = edgeq.load(bundle).manifest
    assert manifest.preprocess.letterbox and manifest.postprocess.kind == "ssd_anchors"
    assert manifest.postprocess.min_score == 0.6 and manifest.labels == ("face",)
    picture = shared_path("data", "faces", "cameraman.png")
    out = tmp_path / "drawn.png"
    proc = example("detect_faces.py", str(bundle), str(picture), str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "1 face(s)" in proc.stdout and "nose tip" in proc.stdout and f"wrote {out}" in proc.stdout
    drawn = np.asarray(Image.open(out).convert("RGB"))
    assert drawn.shape[:2] == (512, 512)
    assert ((drawn[..., 0] > 200) & (drawn[..., 1] < 60)).sum() > 200  # the red box
    assert ((drawn[..., 1] > 200) & (drawn[..., 0] < 60)).sum() > 20  # the green keypoints


def test_remote_test_against_a_loopback_server(demo, env, tmp_path):
    log = tmp_path / "serve.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "edgeq.cli", "serve", "--host", "127.0.0.1", "--port", "0",
         "--runtime", str(demo / "colours.edgeq")],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while "listening on" not in log.read_text():
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        line = next(l for l in log.read_text().splitlines() if "listening on" in l)
        address = line.split("listening on ")[1].split()[0]
        pictures = tmp_path / "pictures"
        pictures.mkdir()
        for name in ("red.png", "green.png"):
            (pictures / name).write_bytes((demo / name).read_bytes())
        proc = example("remote_test.py", str(demo / "colours.edgeq"), address, str(pictures), env=env, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"{address} (" in proc.stdout and "PASS" in proc.stdout and "latency p50" in proc.stdout
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
