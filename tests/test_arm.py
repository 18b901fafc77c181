"""Raspberry Pi and other 64-bit ARM boards: cross-compiled bundles, proven on an emulated device.

Every shared TFLite model is packaged for ``x86_64``, ``rpi4`` and ``rpi5`` once per model. The
ARM bundles run inside the emulated Raspberry Pi userland (Debian bookworm arm64 python3 under
qemu-aarch64, see ``tests/emulator``) with edgeq's device side only: ``edgeq/`` with ``runtime/``
as ``edgeq/runtime`` in a throw-away site folder, exactly the layout ``pip install edgeq`` gives,
and no ``tvm``. Emulation is 10-50x slower than native, so each ARM bundle runs a few pictures
in ONE emulated python process (inputs and outputs travel as .npy files).

Needs network the first time (Debian arm64 packages, the aarch64 TVM wheels); cached after.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

import edgeq
from bundles import OUTPUT_KIND, PICTURES, PREPROCESS, pictures_for
from conftest import REPO_ROOT, shared_path
from emulator import ensure_aarch64_root, run_aarch64_python

pytestmark = pytest.mark.network

ARM_DEVICES = ("rpi4", "rpi5")
PICTURES_PER_MODEL = 3
OBJDUMP = "aarch64-linux-gnu-objdump"
DOT_PRODUCT = ("sdot", "udot")
# Every output must be identical, float models included: edgeq keeps float multiplies and adds
# apart (no FMA, edgeq.schedules.float_exact), so the Pi rounds as the x86_64 build does.

# Runs inside the emulated python. Usage: driver.py BUNDLE WORKDIR COUNT
# reads WORKDIR/in{i}_{k}.npy, writes WORKDIR/{cores,single}{i}_{k}.npy: the outputs with one
# thread per board core (4, what a Pi runs by default) and with one thread.
DRIVER = textwrap.dedent(
    '''
    import sys
    import numpy as np
    import edgeq

    bundle, work, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    predictor_cores = 4  # rpi4 and rpi5
    predictor = edgeq.load(bundle, num_threads=predictor_cores)  # as on the board: one per core
    threads = predictor.num_threads
    n_inputs = len(predictor.manifest.inputs)
    for i in range(count):
        inputs = [np.load(f"{work}/in{i}_{k}.npy") for k in range(n_inputs)]
        for tag, n in (("cores", threads), ("single", 1)):
            predictor._vm.set_num_threads(n)
            for k, out in enumerate(predictor.run(inputs)):
                np.save(f"{work}/{tag}{i}_{k}.npy", out)
    assert "tvm" not in sys.modules and "tvm_ffi" not in sys.modules, "the device side imported tvm"
    print("threads", threads)
    '''
)


def _device_site(directory: Path) -> Path:
    """edgeq's device side laid out as an install lays it out (edgeq.runtime from runtime/)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO_ROOT / "edgeq", directory / "edgeq", ignore=ignore)
    shutil.copytree(REPO_ROOT / "runtime", directory / "edgeq" / "runtime", ignore=ignore, dirs_exist_ok=True)
    shutil.copytree(REPO_ROOT / "deploy_targets", directory / "edgeq" / "deploy_targets", ignore=ignore, dirs_exist_ok=True)
    return directory


@pytest.fixture(scope="module")
def root() -> Path:
    return ensure_aarch64_root()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return _device_site(tmp_path_factory.mktemp("device-site"))


def _emulated(root: Path, site: Path, args: list[str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    return run_aarch64_python(root, args, timeout=timeout, env=env)


def _require_cross_compiler() -> None:
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("aarch64-linux-gnu-gcc missing: apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross")


# EfficientNet-Lite0: the largest model (packaging 30-40 s per device here, emulated runs ~10x slower): slow.
SLOW_MODELS = {"efficientnet_lite0_uint8.tflite"}
MODEL_PARAMS = [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_MODELS else name for name in sorted(PICTURES)]


@pytest.fixture(scope="module", params=MODEL_PARAMS)
def bundles(request, tmp_path_factory) -> tuple[str, dict[str, Path]]:
    """One model packaged for x86_64, rpi4 and rpi5 (default compile options)."""
    name = request.param
    model = shared_path("models", "tflite", name)
    _require_cross_compiler()
    out = tmp_path_factory.mktemp("arm-bundles")
    paths = {}
    for device in ("x86_64", *ARM_DEVICES):
        options = edgeq.PackageOptions(device=device, preprocess=PREPROCESS.get(name, {}))
        paths[device] = edgeq.package(model, out / f"{model.stem}-{device}.edgeq", options).path
    return name, paths


@pytest.fixture(scope="module")
def emulated(bundles, root, site, tmp_path_factory):
    """x86_64 outputs for a few pictures, and each ARM bundle's outputs for the same inputs."""
    name, paths = bundles
    host = edgeq.load(paths["x86_64"])
    pictures = pictures_for(name)[:PICTURES_PER_MODEL]
    assert pictures, f"no pictures for {name}"
    work = tmp_path_factory.mktemp("arm-io")
    expected = []
    for i, picture in enumerate(pictures):
        inputs = host.preprocess(picture)
        for k, tensor in enumerate(inputs):
            np.save(work / f"in{i}_{k}.npy", tensor)
        expected.append(host.run(inputs))
    driver = work / "driver.py"
    driver.write_text(DRIVER)
    got = {}
    for device in ARM_DEVICES:
        device_work = work / device
        device_work.mkdir()
        for f in work.glob("in*.npy"):
            shutil.copy(f, device_work / f.name)
        _emulated(root, site, [str(driver), str(paths[device]), str(device_work), str(len(pictures))])
        got[device] = {
            tag: [[np.load(device_work / f"{tag}{i}_{k}.npy") for k in range(len(expected[i]))] for i in range(len(pictures))]
            for tag in ("cores", "single")
        }
    return name, [p.name for p in pictures], expected, got


def _assert_same(name: str, picture: str, device: str, got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for index, (g, w) in enumerate(zip(got, want)):
        where = f"{name} {device} {picture} output {index}"
        assert g.shape == w.shape and g.dtype == w.dtype, f"{where}: {g.dtype}{g.shape} vs {w.dtype}{w.shape}"
        differ = int(np.count_nonzero(g != w))
        assert differ == 0, f"{where}: {differ} of {g.size} values differ (max {np.abs(g.astype(np.float64) - w).max()})"


@pytest.mark.parametrize("device", ARM_DEVICES)
def test_arm_bundle_matches_x86_single_thread(emulated, device):
    """Same code generation: one thread on the emulated board gives the x86_64 bundle's outputs."""
    name, pictures, expected, got = emulated
    for picture, want, outs in zip(pictures, expected, got[device]["single"]):
        _assert_same(name, picture, device, outs, want)


@pytest.mark.parametrize("device", ARM_DEVICES)
def test_arm_bundle_matches_x86_one_thread_per_core(emulated, device):
    """With one thread per board core (4): the x86_64 bundle's outputs, run after run."""
    name, pictures, expected, got = emulated
    for picture, want, outs in zip(pictures, expected, got[device]["cores"]):
        _assert_same(name, picture, device, outs, want)


# -- dot-product instructions (rpi5: Cortex-A76 +dotprod) ----------------------------------------


def _dot_product_count(bundle: Path, tmp_path: Path) -> int:
    if shutil.which(OBJDUMP) is None:
        pytest.skip(f"{OBJDUMP} missing: apt-get install binutils-aarch64-linux-gnu")
    library = tmp_path / f"{bundle.stem}.so"
    with zipfile.ZipFile(bundle) as archive:
        library.write_bytes(archive.read("model/library.so"))
    listing = subprocess.run([OBJDUMP, "-d", str(library)], capture_output=True, text=True, check=True).stdout
    return len(re.findall(r"^\s*[0-9a-f]+:\t[0-9a-f ]+\t(?:" + "|".join(DOT_PRODUCT) + r")\t", listing, flags=re.M))


def test_rpi5_library_uses_dot_product_instructions(bundles, tmp_path):
    name, paths = bundles
    if OUTPUT_KIND[name] == "float":
        pytest.skip(f"{name} is a float model: no int8 kernels")
    # uint8 models too: the integer import runs their kernels on int8 activations (x - 128).
    assert _dot_product_count(paths["rpi5"], tmp_path) > 0, f"no sdot/udot in the rpi5 library of {name}"
    # The Pi 4's Cortex-A72 has no dot product: its library must not use them.
    assert _dot_product_count(paths["rpi4"], tmp_path) == 0


# -- wrong architecture, 32-bit boards, missing cross compiler -----------------------------------

SMALL_MODEL = "mltk_rps96_float32.tflite"  # packages in seconds


@pytest.fixture(scope="module")
def small_bundles(tmp_path_factory) -> dict[str, Path]:
    model = shared_path("models", "tflite", SMALL_MODEL)
    _require_cross_compiler()
    out = tmp_path_factory.mktemp("small")
    return {
        device: edgeq.package(model, out / f"{device}.edgeq", edgeq.PackageOptions(device=device)).path
        for device in ("x86_64", "rpi4")
    }


def test_rpi4_bundle_on_x86_64_is_refused(small_bundles):
    if edgeq.devices.host_arch() != "x86_64":
        pytest.skip("checks an aarch64 bundle on an x86_64 host")
    with pytest.raises(edgeq.ArchitectureMismatchError) as error:
        edgeq.load(small_bundles["rpi4"])
    message = str(error.value)
    assert "compiled for aarch64" in message and "'rpi4'" in message and "machine is x86_64" in message
    assert "--device" in message


def test_x86_64_bundle_on_emulated_pi_is_refused(small_bundles, root, site, tmp_path):
    script = tmp_path / "wrong_arch.py"
    script.write_text(textwrap.dedent(
        """
        import sys
        import edgeq
        try:
            edgeq.load(sys.argv[1])
        except edgeq.ArchitectureMismatchError as error:
            print("REFUSED:", error)
        else:
            print("LOADED")
        """
    ))
    out = _emulated(root, site, [str(script), str(small_bundles["x86_64"])]).stdout
    assert "REFUSED:" in out, out
    assert "compiled for x86_64" in out and "machine is aarch64" in out and "--device" in out


@pytest.mark.parametrize("device", ["armv7", "rpi3-32bit"])
def test_32_bit_arm_is_refused_with_the_way_out(device, tmp_path):
    model = shared_path("models", "tflite", SMALL_MODEL)
    with pytest.raises(edgeq.UnknownDeviceError) as error:
        edgeq.package(model, tmp_path / "x.edgeq", edgeq.PackageOptions(device=device))
    message = str(error.value)
    assert "not supported" in message and "32-bit" in message
    assert "64-bit OS" in message and "--device rpi4" in message


@pytest.mark.parametrize("device", ["armv7", "rpi3-32bit"])
def test_32_bit_arm_cli_message(device, tmp_path, capsys):
    from edgeq.cli import main

    model = shared_path("models", "tflite", SMALL_MODEL)
    status = main(["package", str(model), "--device", device, "-o", str(tmp_path / "x.edgeq")])
    assert status != 0
    captured = capsys.readouterr()
    assert "64-bit OS" in captured.out + captured.err


def test_missing_cross_compiler_names_the_apt_package(tmp_path, monkeypatch):
    model = shared_path("models", "tflite", SMALL_MODEL)
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(edgeq.MissingDependencyError) as error:
        edgeq.package(model, tmp_path / "x.edgeq", edgeq.PackageOptions(device="rpi4"))
    message = str(error.value)
    assert "aarch64-linux-gnu-gcc" in message and "apt-get install gcc-aarch64-linux-gnu" in message
    assert not (tmp_path / "x.edgeq").exists()


# -- the default CPU schedules: int8 conv2d tensorized with sdot ----------------------------------

SDOT_DRIVER = textwrap.dedent(
    '''
    import sys
    from pathlib import Path
    import numpy as np
    from edgeq.runtime import RelaxVM, load_runtime

    runtime_dir, library, x_path, out_path = sys.argv[1:5]
    vm = RelaxVM(load_runtime(Path(runtime_dir), "test"), Path(library))
    vm.set_num_threads(1)
    np.save(out_path, vm.run([np.load(x_path)])[0])
    '''
)


def test_default_schedules_tensorize_int8_conv_with_sdot(root, site, tmp_path):
    """edgeq's default CPU schedules give sdot code for rpi5, bit-exact on the Pi."""
    _require_cross_compiler()
    tvm = pytest.importorskip("tvm")
    from tvm.script import relax as R

    from edgeq.devices import get_device
    from edgeq.runtime_libs import runtime_libraries
    from edgeq.schedules import build_cpu
    from edgeq.schedules.dotprod import SDOT, dot_products

    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, (1, 8, 8, 16), dtype=np.int8)
    w = rng.integers(-128, 128, (3, 3, 16, 32), dtype=np.int8)

    @tvm.script.ir_module
    class Conv:
        @R.function
        def main(x: R.Tensor((1, 8, 8, 16), "int8")) -> R.Tensor((1, 6, 6, 32), "int32"):
            with R.dataflow():
                y = R.nn.conv2d(x, R.const(w), data_layout="NHWC", kernel_layout="HWIO", out_dtype="int32")
                R.output(y)
            return y

    target = tvm.target.Target(get_device("rpi5").tvm_target)
    assert dot_products(target) == SDOT and dot_products(tvm.target.Target(get_device("rpi4").tvm_target)) == ()
    library = tmp_path / "conv.so"
    build_cpu(Conv, target).export_library(
        str(library), fcompile=tvm.support.cc.cross_compiler("aarch64-linux-gnu-gcc")
    )
    if shutil.which(OBJDUMP) is None:
        pytest.skip(f"{OBJDUMP} missing: apt-get install binutils-aarch64-linux-gnu")
    listing = subprocess.run([OBJDUMP, "-d", str(library)], capture_output=True, text=True, check=True).stdout
    assert re.search(r"\tsdot\t", listing), "no sdot in the tensorized conv2d"

    want = np.zeros((1, 6, 6, 32), np.int64)
    for ry in range(3):
        for rx in range(3):
            want += np.einsum("nhwc,cf->nhwf", x[:, ry:ry + 6, rx:rx + 6, :].astype(np.int64), w[ry, rx].astype(np.int64))
    np.save(tmp_path / "x.npy", x)
    driver = tmp_path / "sdot_driver.py"
    driver.write_text(SDOT_DRIVER)
    runtime_dir = runtime_libraries("aarch64").files["libtvm_ffi.so"].parent
    _emulated(root, site, [str(driver), str(runtime_dir), str(library), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")])
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), want.astype(np.int32))
