"""GPU bundles, checked without a GPU: every shared model packages for cuda-sm90 and
jetson-orin-nano with kernels compiled for the chip, the right runtime libraries and manifest;
loading where there is no NVIDIA driver fails clearly; the kernel callback serves the kernels.

Running them on a GPU is benchmarks/gpu_check.sh (see README).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import edgeq
from conftest import REPO_ROOT, shared_path
from edgeq.cuda_build import find_nvcc, kernel_count, source_key
from edgeq.errors import MissingDependencyError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MODELS = sorted(p.name for p in shared_path("models", "tflite").glob("*.tflite"))
GPU_DEVICES = {"cuda-sm90": ("x86_64", "sm_90"), "jetson-orin-nano": ("aarch64", "sm_87")}
ELF_MACHINE = {"x86_64": 62, "aarch64": 183}
FATBIN_MAGIC = 0xBA55ED50


def _have_nvcc() -> bool:
    try:
        find_nvcc()
        return True
    except MissingDependencyError:
        return False


needs_nvcc = pytest.mark.skipif(not _have_nvcc(), reason="GPU bundles compile their kernels with nvcc")


def elf_machine(data: bytes) -> int:
    assert data[:4] == b"\x7fELF", "not an ELF file"
    return struct.unpack_from("<H", data, 18)[0]


def fatbin_entries(data: bytes) -> list[tuple[str, int]]:
    """(kind, sm version) of every entry of a CUDA fatbin ("elf" = machine code, "ptx")."""
    magic, _version, header_size, size = struct.unpack_from("<IHHQ", data, 0)
    assert magic == FATBIN_MAGIC, "not a CUDA fatbin"
    entries, offset, end = [], header_size, header_size + size
    while offset < end:
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, offset)
        arch = struct.unpack_from("<I", data, offset + 28)[0]
        entries.append(({1: "ptx", 2: "elf"}.get(kind, str(kind)), arch))
        offset += entry_header + payload
    return entries


@pytest.fixture(scope="module")
def gpu_bundles(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Every shared model packaged for each GPU device (once per module)."""
    if not _have_nvcc():
        pytest.skip("GPU bundles compile their kernels with nvcc")
    out = tmp_path_factory.mktemp("gpu")
    bundles = {}
    for device in GPU_DEVICES:
        for model in MODELS:
            path = out / f"{Path(model).stem}.{device}.edgeq"
            edgeq.package(shared_path("models", "tflite", model), path, edgeq.PackageOptions(device=device))
            bundles[(model, device)] = path
    return bundles


@needs_nvcc
@pytest.mark.parametrize("device", sorted(GPU_DEVICES))
@pytest.mark.parametrize("model", MODELS)
def test_gpu_bundle_contents(gpu_bundles, model, device):
    arch, sm = GPU_DEVICES[device]
    path = gpu_bundles[(model, device)]
    with zipfile.ZipFile(path) as bundle:
        data = json.loads(bundle.read("manifest.json"))
        names = set(bundle.namelist())
        assert data["format_version"] == 2
        assert data["target"] == {**data["target"], "device": device, "arch": arch, "kind": "cuda"}
        gpu = data["gpu"]
        assert gpu["arch"] == sm and gpu["cuda_runtime"] == "13" and gpu["min_driver"] == "580"
        assert gpu["compiler"].startswith("nvcc ") and gpu["kernels"]
        number = int(sm.removeprefix("sm_"))
        for key, member in gpu["kernels"].items():
            fatbin = bundle.read(member)
            assert len(key) == 64 and member in names
            # machine code for the chip, plus PTX the driver can compile for newer chips
            assert sorted(fatbin_entries(fatbin)) == [("elf", number), ("ptx", number)]
        for library in ("libtvm_ffi.so", "libtvm_runtime.so", "libtvm_runtime_cuda.so", "libcudart.so.13"):
            assert elf_machine(bundle.read(f"runtime/{library}")) == ELF_MACHINE[arch], library
        assert elf_machine(bundle.read(data["library"])) == ELF_MACHINE[arch]
        report = data["compile_report"]["cuda"]
        assert report["arch"] == sm and report["kernels"] > 0 and report["cuda_graph"] is True


@needs_nvcc
def test_quantized_gpu_bundles_use_integer_kernels(gpu_bundles):
    """Pre-quantized models keep edgeq's integer lowering on the GPU (bit-exact path)."""
    for model in MODELS:
        if "int8" in model or "uint8" in model:
            with zipfile.ZipFile(gpu_bundles[(model, "cuda-sm90")]) as bundle:
                report = json.loads(bundle.read("manifest.json"))["compile_report"]
            assert report["importer"] == "edgeq-integer", model
            integer = report["integer"]
            assert integer["macs_integer"] >= 0.99 * integer["macs_total"], model


@needs_nvcc
def test_gpu_bundle_without_driver_fails_clearly(gpu_bundles, tmp_path):
    """No NVIDIA driver here: a clear GpuUnavailableError, never a silent CPU run or a traceback."""
    path = gpu_bundles[("mlperf_tiny_resnet_cifar10_int8.tflite", "cuda-sm90")]
    code = (
        "import edgeq, sys\n"
        "try:\n"
        f"    edgeq.load({str(path)!r})\n"
        "except edgeq.GpuUnavailableError as error:\n"
        "    print(error); sys.exit(3)\n"
    )
    env = {**os.environ, "LD_LIBRARY_PATH": str(tmp_path)}  # no libcuda.so.1 can be found
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if result.returncode == 0:
        pytest.skip("this machine has an NVIDIA driver")
    assert result.returncode == 3, result.stderr
    assert "no NVIDIA driver" in result.stdout and "never falls back to the CPU" in result.stdout
    assert "Traceback" not in result.stderr


@needs_nvcc
def test_jetson_bundle_on_x86_is_wrong_arch(gpu_bundles):
    with pytest.raises(edgeq.ArchitectureMismatchError, match="compiled for aarch64"):
        edgeq.load(gpu_bundles[("mlperf_tiny_resnet_cifar10_int8.tflite", "jetson-orin-nano")])


def test_driver_and_chip_checks():
    from edgeq.runtime.cuda import CudaUnavailable, DriverInfo, GpuDevice, pick_device

    h100 = GpuDevice(0, "NVIDIA H100", (9, 0))
    a100 = GpuDevice(1, "NVIDIA A100", (8, 0))
    driver = DriverInfo(13000, (a100, h100))
    assert pick_device(driver, "sm_90") == h100  # the first GPU that can run the kernels
    assert pick_device(driver, "sm_80") == a100
    assert pick_device(driver, "sm_80", device_id=0) == h100  # newer chip: through the bundled PTX
    with pytest.raises(CudaUnavailable, match=r"compiled for sm_90.*1: NVIDIA A100 \(sm_80\)"):
        pick_device(driver, "sm_90", device_id=1)
    with pytest.raises(CudaUnavailable, match=r"supports CUDA 12.8.*needs CUDA 13.0.*R580"):
        pick_device(DriverInfo(12080, (h100,)), "sm_90")
    with pytest.raises(CudaUnavailable, match="there is no GPU 4"):
        pick_device(driver, "sm_80", device_id=4)


def test_kernel_callback_serves_bundled_kernels(tmp_path):
    """The runtime's tvm_callback_cuda_compile returns the fatbin stored for a source's sha256
    (in a process without the tvm package: it would register its own compiler callback)."""
    code = f"""
import sys, hashlib
sys.path.insert(0, {str(REPO_ROOT / "tests")!r})
from edgeq.runtime.ffi import RuntimeLibrary
from edgeq.runtime.cuda import KERNELS
from edgeq.runtime_libs import runtime_libraries
runtime = RuntimeLibrary(runtime_libraries("x86_64").files)
source = 'extern "C" __global__ void k(float* x) {{ x[0] = 1.0f; }}' * 5
KERNELS.add(hashlib.sha256(source.encode()).hexdigest(), b"\\x50\\xed\\x55\\xba" + bytes(range(256)) * 40)
KERNELS.install(runtime)
compile = runtime.get_global("tvm_callback_cuda_compile")
out = compile(source)
assert out == b"\\x50\\xed\\x55\\xba" + bytes(range(256)) * 40, len(out)
try:
    compile("another source")
except Exception as error:
    print("refused:", error)
assert "tvm" not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "no compiled kernels for CUDA source" in result.stdout


def test_nvcc_missing_is_named(monkeypatch, tmp_path):
    import edgeq.cuda_build as cuda_build

    monkeypatch.setenv("PATH", str(tmp_path))
    for var in ("CUDA_HOME", "CUDA_PATH", "EDGEQ_NVCC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cuda_build, "DEFAULT_NVCC", str(tmp_path / "none" / "nvcc"))
    with pytest.raises(MissingDependencyError, match="needs nvcc from the CUDA toolkit.*EDGEQ_NVCC"):
        find_nvcc()


def test_offline_cuda_runtime_names_the_wheel(tmp_path):
    """--runtime-wheels without the CUDA runtime wheel: the error says which wheel and how to get it."""
    from edgeq.runtime_libs import CUDART_VERSION, RuntimeLibrariesError, cuda_runtime_libraries

    empty = tmp_path / "wheels"
    empty.mkdir()
    with pytest.raises(RuntimeLibrariesError) as error:
        cuda_runtime_libraries("x86_64", wheels_dir=empty, cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert f"nvidia-cuda-runtime=={CUDART_VERSION}" in message and "python3 -m pip download" in message
    assert "--platform manylinux_2_28_x86_64" in message and "--runtime-wheels" in message


def test_kernel_keys_and_counts():
    source = 'extern "C" __global__ void a(float* x);\nextern "C" __global__ void a(float* x) {\n}\n'
    assert kernel_count(source) == 1
    assert source_key(source) == hashlib.sha256(source.encode()).hexdigest()
