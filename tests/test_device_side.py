"""The device path: a fresh environment with only numpy, Pillow, cffi and edgeq - no tvm, no compiler.

The environment gets the versions Debian bookworm / Raspberry Pi OS ship (numpy 1.24, Pillow 9.4,
cffi 1.15), since a Pi user installs those with apt.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import edgeq
from conftest import REPO_ROOT, shared_path

DEVICE_PACKAGES = ["numpy==1.24.*", "pillow==9.4.*", "cffi==1.15.*"]

CHECK = textwrap.dedent(
    """
    import importlib.util, json, sys
    assert importlib.util.find_spec("tvm") is None, "tvm must not be installed here"
    assert importlib.util.find_spec("tvm_ffi") is None, "tvm_ffi must not be installed here"
    import edgeq
    predictor = edgeq.load(sys.argv[1])
    result = predictor.predict(sys.argv[2])
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("tvm", "tvm_ffi", "tflite"))
    import numpy, PIL
    print(json.dumps({"index": result.top.index, "label": result.top.label, "loaded": loaded,
                      "numpy": numpy.__version__, "pillow": PIL.__version__}))
    """
)


@pytest.fixture(scope="module")
def device_env(tmp_path_factory) -> Path:
    env_dir = tmp_path_factory.mktemp("device-env") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + DEVICE_PACKAGES, check=True, timeout=600)
    # Build edgeq's wheel here (as a release would) and install just that on the "device".
    wheels = env_dir.parent / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels)]
    subprocess.run(build + [str(REPO_ROOT)], check=True, timeout=600)
    subprocess.run(pip + ["--no-deps", *map(str, wheels.glob("edgeq-*.whl"))], check=True, timeout=600)
    return env_dir


@pytest.mark.network
def test_fresh_device_environment_predicts_without_tvm(device_env, tmp_path):
    model = shared_path("models", "tflite", "efficientnet_lite0_uint8.tflite")
    picture = shared_path("data", "imagenet-samples", "imagenet_00_243.jpg")
    bundle = edgeq.package(model, tmp_path / "efficientnet.edgeq").path
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    # No compiler on PATH, no host site-packages, run from a folder without the source tree.
    env = {"PATH": str(device_env / "bin"), "HOME": str(tmp_path), "CC": "/nonexistent/cc"}
    done = subprocess.run(
        [str(device_env / "bin" / "python"), "-I", str(script), str(bundle), str(picture)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    import json

    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["index"], result["label"]) == (243, "bull mastiff")
    assert result["loaded"] == []
    assert result["numpy"].startswith("1.24") and result["pillow"].startswith("9.4")
