"""edgeq.runtime_libs: host libraries from the installed packages; other-arch libraries from
manylinux wheels, fetched once, cached, verified against RECORD, usable offline."""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from edgeq import runtime_libs
from edgeq.errors import EdgeqError
from edgeq.runtime_libs import RuntimeLibrariesError, WheelIntegrityError, host_arch, runtime_libraries

TVM_V, FFI_V = md.version("apache-tvm"), md.version("apache-tvm-ffi")
OTHER = "aarch64" if host_arch() == "x86_64" else "x86_64"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def fake_wheel(folder: Path, dist: str, version: str, member: str, plats: list[str], *,
               payload: bytes | None = None, recorded: bytes | None = None) -> Path:
    """A minimal wheel holding ``member``; ``recorded`` (if given) is what RECORD claims it holds."""
    payload = payload if payload is not None else f"\x7fELF fake {member}".encode()
    recorded = recorded if recorded is not None else payload
    info = f"{dist}-{version}.dist-info"
    py = "py3-none" if dist == "apache_tvm" else "cp311-cp311"
    path = folder / f"{dist}-{version}-{py}-{'.'.join(plats)}.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\n" + "".join(f"Tag: {py}-{p}\n" for p in plats))
        zf.writestr(f"{info}/RECORD", f"{member},sha256={_b64(recorded)},{len(recorded)}\n{info}/RECORD,,\n")
    return path


def make_fake_wheels(folder: Path, arch: str = OTHER, **tamper: bytes) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [
        fake_wheel(folder, "apache_tvm", TVM_V, "tvm/lib/libtvm_runtime.so",
                   [f"manylinux_2_27_{arch}", f"manylinux_2_28_{arch}"], **tamper),
        fake_wheel(folder, "apache_tvm_ffi", FFI_V, "tvm_ffi/lib/libtvm_ffi.so",
                   [f"manylinux_2_24_{arch}", f"manylinux_2_28_{arch}"]),
    ]


@pytest.fixture()
def fake_pip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """Replace the pip download with a copy of fake wheels; returns the list of calls made."""
    calls: list[str] = []
    origin = tmp_path / "index"
    make_fake_wheels(origin)

    def download(arch: str, dest: Path, progress: object) -> None:
        calls.append(arch)
        for whl in origin.glob("*.whl"):
            shutil.copy(whl, dest)

    monkeypatch.setattr(runtime_libs, "_pip_download", download)
    return calls


def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to download")

    monkeypatch.setattr(runtime_libs, "_pip_download", fail)


def test_host_libraries_come_from_installed_packages() -> None:
    libs = runtime_libraries(host_arch())
    assert set(libs.files) == {"libtvm_ffi.so", "libtvm_runtime.so"}
    assert libs.files["libtvm_runtime.so"].parent.parent.name == "tvm"
    assert libs.files["libtvm_ffi.so"].parent.parent.name == "tvm_ffi"
    assert all(p.is_file() for p in libs.files.values())
    assert libs.platform.endswith(host_arch())
    assert (libs.tvm_version, libs.tvm_ffi_version) == (TVM_V, FFI_V)
    major, minor = map(int, libs.glibc_floor.split("."))
    assert major == 2 and 5 <= minor <= 40


def test_fetch_once_then_cached_then_offline(tmp_path: Path, fake_pip: list[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    first = runtime_libraries(OTHER, cache_dir=cache)
    assert fake_pip == [OTHER]
    assert first.platform == f"manylinux_2_28_{OTHER}"
    assert first.glibc_floor == "2.27"  # tvm wheel: 2.27, ffi wheel: 2.24 -> both need 2.27
    assert first.files["libtvm_runtime.so"].read_bytes() == b"\x7fELF fake tvm/lib/libtvm_runtime.so"

    second = runtime_libraries(OTHER, cache_dir=cache)  # cached: no second download
    assert fake_pip == [OTHER] and second == first

    no_network(monkeypatch)
    offline = runtime_libraries(OTHER, wheels_dir=cache / "wheels", cache_dir=tmp_path / "elsewhere")
    assert {k: v.read_bytes() for k, v in offline.files.items()} == {
        k: v.read_bytes() for k, v in first.files.items()}
    assert offline.platform == first.platform and offline.glibc_floor == first.glibc_floor


def test_default_cache_dir_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       fake_pip: list[str]) -> None:
    monkeypatch.setenv("EDGEQ_CACHE_DIR", str(tmp_path / "c"))
    assert runtime_libs.default_cache_dir() == tmp_path / "c" / "runtime"
    libs = runtime_libraries(OTHER)
    assert libs.files["libtvm_ffi.so"].is_relative_to(tmp_path / "c" / "runtime")
    monkeypatch.delenv("EDGEQ_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert runtime_libs.default_cache_dir() == tmp_path / "xdg" / "edgeq" / "runtime"


def test_tampered_wheel_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_network(monkeypatch)
    make_fake_wheels(tmp_path / "wheels", payload=b"\x7fELF evil", recorded=b"\x7fELF good")
    with pytest.raises(WheelIntegrityError, match="sha256") as err:
        runtime_libraries(OTHER, wheels_dir=tmp_path / "wheels", cache_dir=tmp_path / "cache")
    assert isinstance(err.value, EdgeqError)
    assert not list((tmp_path / "cache").glob("*/libtvm_runtime.so*"))  # no file, no temp file left


def test_tampered_extracted_library_is_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_network(monkeypatch)
    make_fake_wheels(tmp_path / "wheels")
    libs = runtime_libraries(OTHER, wheels_dir=tmp_path / "wheels", cache_dir=tmp_path / "cache")
    good = libs.files["libtvm_ffi.so"].read_bytes()
    libs.files["libtvm_ffi.so"].write_bytes(b"changed")
    again = runtime_libraries(OTHER, wheels_dir=tmp_path / "wheels", cache_dir=tmp_path / "cache")
    assert again.files["libtvm_ffi.so"].read_bytes() == good


def test_corrupt_wheel_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_network(monkeypatch)
    wheels = make_fake_wheels(tmp_path / "wheels")
    wheels[0].write_bytes(b"not a zip")
    with pytest.raises(WheelIntegrityError, match="delete it"):
        runtime_libraries(OTHER, wheels_dir=tmp_path / "wheels", cache_dir=tmp_path / "cache")


def test_offline_folder_without_wheels_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_network(monkeypatch)
    make_fake_wheels(tmp_path / "wheels", arch=host_arch())  # wrong arch only
    with pytest.raises(RuntimeLibrariesError, match=r"pip download .*--runtime-wheels DIR"):
        runtime_libraries(OTHER, wheels_dir=tmp_path / "wheels", cache_dir=tmp_path / "cache")


def test_no_network_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert "download" in cmd and f"apache-tvm=={TVM_V}" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (Network is unreachable)")

    monkeypatch.setattr(runtime_libs.subprocess, "run", offline_pip)
    with pytest.raises(RuntimeLibrariesError, match="no network") as err:
        runtime_libraries(OTHER, cache_dir=tmp_path / "cache")
    assert "Network is unreachable" in str(err.value) and "--runtime-wheels DIR" in str(err.value)
    assert not list((tmp_path / "cache" / "wheels").glob("*.whl"))


def test_unknown_arch_is_an_edgeq_error() -> None:
    with pytest.raises(RuntimeLibrariesError, match="x86_64, aarch64"):
        runtime_libraries("riscv64")


def test_glibc_floor_of_tags() -> None:
    assert runtime_libs._glibc_of("manylinux2014_aarch64") == (2, 17)
    assert runtime_libs._glibc_of("manylinux_2_28_aarch64") == (2, 28)
    assert runtime_libs._glibc_of("linux_aarch64") is None
    plat, floor = runtime_libs._summarize([["manylinux2014_aarch64"], ["manylinux_2_17_aarch64"]], "aarch64")
    assert floor == "2.17" and plat in {"manylinux2014_aarch64", "manylinux_2_17_aarch64"}


@pytest.mark.network
def test_real_aarch64_wheels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real PyPI wheels: aarch64 ELF files, manylinux_2_28 tag, glibc 2.27; then offline."""
    if host_arch() == "aarch64":
        pytest.skip("host is aarch64: the aarch64 libraries come from the installed packages")
    libs = runtime_libraries("aarch64", cache_dir=tmp_path / "cache", progress=print)
    assert libs.platform == "manylinux_2_28_aarch64" and libs.glibc_floor == "2.27"
    for path in libs.files.values():
        head = path.read_bytes()[:20]
        assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64

    no_network(monkeypatch)
    offline = runtime_libraries("aarch64", wheels_dir=tmp_path / "cache" / "wheels", cache_dir=tmp_path / "other")
    for name, path in libs.files.items():
        assert offline.files[name].read_bytes() == path.read_bytes()
