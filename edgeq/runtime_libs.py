"""The TVM runtime libraries a device needs: ``libtvm_ffi.so`` and ``libtvm_runtime.so``.

For the host architecture they come from the installed ``apache-tvm`` / ``apache-tvm-ffi``
packages. For another architecture, the manylinux wheels of exactly the installed versions are
fetched once with ``pip download`` into a per-user cache (or taken from a folder of wheels,
offline), and the two libraries are extracted and checked against the sha256 in the wheel's
RECORD.
"""
from __future__ import annotations

import base64
import importlib.metadata as md
import os
import platform as _platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .bundle import sha256_file
from .errors import EdgeqError, MissingDependencyError

__all__ = [
    "RuntimeLibraries",
    "RuntimeLibrariesError",
    "WheelIntegrityError",
    "default_cache_dir",
    "host_arch",
    "pip_download_command",
    "runtime_libraries",
]

ARCHES = ("x86_64", "aarch64")
# library file name -> (distribution, wheel import-name prefix, path inside the wheel)
_LIBS: dict[str, tuple[str, str, str]] = {
    "libtvm_ffi.so": ("apache-tvm-ffi", "apache_tvm_ffi", "tvm_ffi/lib/libtvm_ffi.so"),
    "libtvm_runtime.so": ("apache-tvm", "apache_tvm", "tvm/lib/libtvm_runtime.so"),
}
# Platform tags offered to pip, newest first. The real 0.27 / 0.1.14 aarch64 wheels are tagged
# manylinux_2_27/2_24 + manylinux_2_28; 2.36 is the glibc of Raspberry Pi OS / Debian bookworm.
_MAX_GLIBC_MINOR = 36
_MIN_GLIBC_MINOR = 17


class RuntimeLibrariesError(EdgeqError):
    """The device runtime libraries cannot be found, fetched or extracted."""


class WheelIntegrityError(RuntimeLibrariesError):
    """A wheel or an extracted library does not match the sha256 recorded in the wheel."""


@dataclass(frozen=True)
class RuntimeLibraries:
    """Where the two runtime libraries for one architecture are, and what they need."""

    platform: str  # wheel platform tag both wheels carry, e.g. "manylinux_2_28_aarch64"
    files: dict[str, Path]  # {"libtvm_ffi.so": ..., "libtvm_runtime.so": ...}
    glibc_floor: str  # lowest glibc both wheels declare support for, e.g. "2.27"
    tvm_version: str
    tvm_ffi_version: str
    wheels: tuple[Path, ...] = field(default=())  # the wheels used (empty for the host)


def host_arch() -> str:
    """The host's architecture in wheel spelling ("x86_64", "aarch64")."""
    machine = _platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def default_cache_dir() -> Path:
    """``$EDGEQ_CACHE_DIR/runtime``, else ``$XDG_CACHE_HOME/edgeq/runtime``, else ``~/.cache/edgeq/runtime``."""
    if os.environ.get("EDGEQ_CACHE_DIR"):
        return Path(os.environ["EDGEQ_CACHE_DIR"]).expanduser() / "runtime"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "edgeq" / "runtime"


def _installed_version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        raise MissingDependencyError(
            f"{dist} is not installed on this host: `pip install {dist}` (edgeq pins the device "
            "runtime to the host's TVM version)"
        ) from None


def _platform_tags(wheel_tags: list[str]) -> list[str]:
    """Platform parts of 'py-abi-plat' tags (or of a wheel filename's dotted platform field)."""
    return [t.rsplit("-", 1)[-1] for t in wheel_tags]


def _glibc_of(tag: str) -> tuple[int, int] | None:
    """glibc version a manylinux platform tag stands for (None for non-manylinux tags)."""
    m = re.fullmatch(r"manylinux_(\d+)_(\d+)_\w+", tag)
    if m:
        return int(m.group(1)), int(m.group(2))
    legacy = {"manylinux2014": (2, 17), "manylinux2010": (2, 12), "manylinux1": (2, 5)}
    return legacy.get(tag.split("_", 1)[0])


def _summarize(per_wheel_tags: list[list[str]], arch: str) -> tuple[str, str]:
    """(common platform tag, glibc floor) of a set of wheels' platform tags."""
    floors = []
    for tags in per_wheel_tags:
        versions = [v for v in (_glibc_of(t) for t in tags if t.endswith(arch)) if v]
        if not versions:
            raise RuntimeLibrariesError(f"wheel platform tags {tags} name no manylinux {arch} platform")
        floors.append(min(versions))
    common = set.intersection(*(set(t) for t in per_wheel_tags))
    candidates = [t for t in (common or set().union(*per_wheel_tags)) if t.endswith(arch) and _glibc_of(t)]
    best = max(candidates, key=lambda t: _glibc_of(t) or (0, 0))
    floor = max(floors)
    return best, f"{floor[0]}.{floor[1]}"


def _record_hash(record_text: str, member: str) -> str:
    """Hex sha256 of ``member`` from a wheel RECORD (urlsafe base64 without padding)."""
    for line in record_text.splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[0] == member and parts[1].startswith("sha256="):
            raw = parts[1][len("sha256="):]
            return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).hex()
    raise WheelIntegrityError(f"the wheel's RECORD has no sha256 for {member}")


def _host_libraries() -> RuntimeLibraries:
    files, tags = {}, []
    for name, (dist_name, _, member) in _LIBS.items():
        _installed_version(dist_name)
        dist = md.distribution(dist_name)
        path = Path(str(dist.locate_file(member))).resolve()
        if not path.is_file():
            raise MissingDependencyError(
                f"{dist_name} is installed but {member} is missing: reinstall it "
                f"(`pip install --force-reinstall --no-deps {dist_name}=={dist.version}`)"
            )
        files[name] = path
        wheel_meta = dist.read_text("WHEEL") or ""
        tags.append(_platform_tags(re.findall(r"^Tag:\s*(\S+)", wheel_meta, re.M)))
    arch = host_arch()
    if not all(any(t.endswith(arch) and _glibc_of(t) for t in ts) for ts in tags):
        # Source or local builds carry no manylinux tag: the running glibc is the best bound known.
        libc, ver = _platform.libc_ver()
        return RuntimeLibraries(f"linux_{arch}", files, ver if libc == "glibc" else "",
                                _installed_version("apache-tvm"), _installed_version("apache-tvm-ffi"))
    plat, floor = _summarize(tags, arch)
    return RuntimeLibraries(plat, files, floor, _installed_version("apache-tvm"),
                            _installed_version("apache-tvm-ffi"))


def _pip_platforms(arch: str) -> list[str]:
    tags = [f"manylinux_2_{m}_{arch}" for m in range(_MAX_GLIBC_MINOR, _MIN_GLIBC_MINOR - 1, -1)]
    return tags + [f"manylinux2014_{arch}"]


def pip_download_command(
    arch: str, dest: str | Path = "DIR", *, python: str = "python", all_platforms: bool = True
) -> list[str]:
    """The ``pip download`` command that fetches the runtime wheels for ``arch`` into ``dest``.

    ``all_platforms=False`` names only ``manylinux_2_28_<arch>`` (what the 0.27 wheels carry),
    which keeps the command short enough to show in an error message.
    """
    cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    for tag in _pip_platforms(arch) if all_platforms else [f"manylinux_2_28_{arch}"]:
        cmd += ["--platform", tag]
    cmd += [
        "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}",
        "--implementation", "cp",
        "-d", str(dest),
        f"apache-tvm=={_installed_version('apache-tvm')}",
        f"apache-tvm-ffi=={_installed_version('apache-tvm-ffi')}",
    ]
    return cmd


def _manual_fix(arch: str) -> str:
    cmd = " ".join(pip_download_command(arch, "DIR", python="python3", all_platforms=False))
    return (f"on a connected machine run `{cmd}` and pass that folder as --runtime-wheels DIR "
            "(wheels_dir=DIR)")


def _find_wheel(folder: Path, prefix: str, version: str, arch: str) -> Path | None:
    """The wheel ``<prefix>-<version>-...`` in ``folder`` with a manylinux ``arch`` platform tag."""
    if not folder.is_dir():
        return None
    found = []
    for whl in sorted(folder.glob(f"{prefix}-{version}-*.whl")):
        plats = whl.name[: -len(".whl")].split("-")[-1].split(".")
        if any(p.endswith(arch) and _glibc_of(p) for p in plats):
            found.append(whl)
    return found[-1] if found else None


def _pip_download(arch: str, dest: Path, progress: Callable[[str], None]) -> None:
    """Download both wheels into ``dest`` (fails with the manual fix when pip cannot)."""
    cmd = pip_download_command(arch, dest, python=sys.executable)
    cmd[4:4] = ["--disable-pip-version-check", "--no-input", "--retries", "2", "--timeout", "30"]
    progress(f"downloading apache-tvm / apache-tvm-ffi manylinux {arch} wheels: {' '.join(cmd[3:])}")
    _run_pip(cmd, f"the {arch} runtime wheels", _manual_fix(arch))


def _run_pip(command: list[str], what: str, fix: str) -> None:
    """Run a ``pip download`` command; failures name what was being fetched and the manual fix."""
    try:
        proc = subprocess.run(command, capture_output=True, text=True)
    except OSError as exc:
        raise MissingDependencyError(f"cannot run pip ({exc}): install pip, or {fix}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise RuntimeLibrariesError(f"could not download {what} (no network?):\n{tail}\nFix: {fix}")


def _expected_sha256(wheel: Path, member: str) -> str:
    """sha256 the RECORD of ``wheel`` gives for ``member``."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
            if not records:
                raise WheelIntegrityError(f"{wheel} has no RECORD file: delete it and fetch it again")
            return _record_hash(zf.read(records[0]).decode(), member)
    except zipfile.BadZipFile as exc:
        raise WheelIntegrityError(f"{wheel} is not a valid wheel ({exc}): delete it and fetch it again") from None


def _extract(wheel: Path, member: str, expected: str, dest: Path) -> None:
    """Extract ``member`` of ``wheel`` to ``dest`` atomically if its sha256 is ``expected``."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".")
    except OSError as exc:
        raise RuntimeLibrariesError(f"cannot write {dest} ({exc}): set EDGEQ_CACHE_DIR") from exc
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            shutil.copyfileobj(src, out)
        if sha256_file(Path(tmp)) != expected:
            raise WheelIntegrityError(
                f"{member} in {wheel} does not match the sha256 in the wheel's RECORD "
                "(corrupt or tampered wheel): delete the wheel and fetch it again"
            )
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    except KeyError:
        raise WheelIntegrityError(f"{wheel} does not contain {member}: delete it and fetch it again") from None
    except zipfile.BadZipFile as exc:
        raise WheelIntegrityError(f"{wheel} is not a valid wheel ({exc}): delete it and fetch it again") from None
    except OSError as exc:
        raise RuntimeLibrariesError(f"cannot extract {member} to {dest} ({exc}): set EDGEQ_CACHE_DIR") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _wheel_platforms(wheel: Path) -> list[str]:
    """Platform tags from the wheel's dist-info WHEEL file (else from its file name)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            meta = [n for n in zf.namelist() if n.endswith(".dist-info/WHEEL")]
            text = zf.read(meta[0]).decode() if meta else ""
    except zipfile.BadZipFile as exc:
        raise WheelIntegrityError(f"{wheel} is not a valid wheel ({exc}): delete it and fetch it again") from None
    tags = re.findall(r"^Tag:\s*(\S+)", text, re.M)
    return _platform_tags(tags) if tags else wheel.name[: -len(".whl")].split("-")[-1].split(".")


def runtime_libraries(
    arch: str,
    *,
    wheels_dir: Path | None = None,
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> RuntimeLibraries:
    """Locate (host) or fetch, extract and verify (other arch) the device's TVM runtime libraries.

    ``wheels_dir`` is a folder of already-downloaded wheels: nothing is downloaded then.
    Otherwise missing wheels are downloaded once into ``cache_dir`` (default:
    :func:`default_cache_dir`) and reused on later calls.
    """
    say = progress or (lambda _msg: None)
    if arch not in ARCHES:
        raise RuntimeLibrariesError(f"unsupported architecture {arch!r}: use one of {', '.join(ARCHES)}")
    if arch == host_arch():
        return _host_libraries()

    versions = {dist: _installed_version(dist) for dist, _, _ in _LIBS.values()}
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    source = Path(wheels_dir) if wheels_dir is not None else cache / "wheels"

    def locate() -> dict[str, Path | None]:
        return {name: _find_wheel(source, prefix, versions[dist], arch) for name, (dist, prefix, _) in _LIBS.items()}

    wheels = locate()
    missing = [_LIBS[n][0] + "==" + versions[_LIBS[n][0]] for n, w in wheels.items() if w is None]
    if missing and wheels_dir is not None:
        raise RuntimeLibrariesError(
            f"no manylinux {arch} wheel of {', '.join(missing)} in {source}: {_manual_fix(arch)}"
        )
    if missing:
        try:
            source.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RuntimeLibrariesError(f"cannot create the cache {source} ({exc}): set EDGEQ_CACHE_DIR") from exc
        with tempfile.TemporaryDirectory(dir=source, prefix=".download-") as tmp:
            _pip_download(arch, Path(tmp), say)
            for whl in Path(tmp).glob("*.whl"):
                os.replace(whl, source / whl.name)
        wheels = locate()
        if any(w is None for w in wheels.values()):
            raise RuntimeLibrariesError(
                f"pip downloaded no manylinux {arch} wheel for {', '.join(missing)}: {_manual_fix(arch)}"
            )

    plat, floor = _summarize([_wheel_platforms(w) for w in wheels.values() if w], arch)
    out_dir = cache / f"{arch}-tvm{versions['apache-tvm']}-ffi{versions['apache-tvm-ffi']}"
    files: dict[str, Path] = {}
    for name, (_, _, member) in _LIBS.items():
        wheel, dest = wheels[name], out_dir / name
        assert wheel is not None
        expected = _expected_sha256(wheel, member)
        if not (dest.is_file() and sha256_file(dest) == expected):
            say(f"extracting {member} from {wheel.name} to {dest}")
            _extract(wheel, member, expected, dest)
        files[name] = dest
    return RuntimeLibraries(plat, files, floor, versions["apache-tvm"], versions["apache-tvm-ffi"],
                            tuple(w for w in wheels.values() if w))


# -- NVIDIA GPU bundles ----------------------------------------------------------------------
# libtvm_runtime_cuda.so (TVM's CUDA device API, kernels and CUDA graphs) links libcudart.so.13,
# which NVIDIA ships in the nvidia-cuda-runtime wheel (redistributable). edgeq pins that wheel.
CUDART_DIST = "nvidia-cuda-runtime"
CUDART_VERSION = "13.0.96"
CUDART_MEMBER = "nvidia/cu13/lib/libcudart.so.13"
TVM_CUDA_MEMBER = "tvm/lib/libtvm_runtime_cuda.so"


def _fetch_wheel(requirement: str, prefix: str, version: str, arch: str, source: Path,
                 wheels_dir: Path | None, say: Callable[[str], None]) -> Path:
    """The wheel ``prefix-version`` for ``arch`` from ``source``, downloaded there once if missing."""
    wheel = _find_wheel(source, prefix, version, arch)
    if wheel is not None:
        return wheel
    command = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-input",
               "--retries", "2", "--timeout", "30", "--no-deps", "--only-binary=:all:"]
    for tag in _pip_platforms(arch):
        command += ["--platform", tag]
    command += ["--python-version", f"{sys.version_info.major}.{sys.version_info.minor}",
                "--implementation", "cp", "-d", "DIR", requirement]
    manual = " ".join(["python3", "-m", "pip", *command[3:]]).replace(" DIR ", " WHEELS ")
    if wheels_dir is not None:
        raise RuntimeLibrariesError(
            f"no manylinux {arch} wheel of {requirement} in {source}: on a connected machine run "
            f"`{manual}` and pass that folder as --runtime-wheels"
        )
    try:
        source.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeLibrariesError(f"cannot create the cache {source} ({exc}): set EDGEQ_CACHE_DIR") from exc
    with tempfile.TemporaryDirectory(dir=source, prefix=".download-") as tmp:
        command[command.index("DIR")] = tmp
        say(f"downloading the {requirement} manylinux {arch} wheel")
        fix = f"on a connected machine run `{manual}` and pass that folder as --runtime-wheels"
        _run_pip(command, f"{requirement} for {arch}", fix)
        for whl in Path(tmp).glob("*.whl"):
            os.replace(whl, source / whl.name)
    wheel = _find_wheel(source, prefix, version, arch)
    if wheel is None:
        raise RuntimeLibrariesError(f"pip downloaded no manylinux {arch} wheel of {requirement}")
    return wheel


def _verified_member(wheel: Path, member: str, dest: Path, say: Callable[[str], None]) -> Path:
    expected = _expected_sha256(wheel, member)
    if not (dest.is_file() and sha256_file(dest) == expected):
        say(f"extracting {member} from {wheel.name}")
        _extract(wheel, member, expected, dest)
    return dest


def cuda_runtime_libraries(
    arch: str,
    *,
    wheels_dir: Path | None = None,
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """``libtvm_runtime_cuda.so`` and ``libcudart.so.13`` for a GPU device whose CPU is ``arch``.

    Both come from wheels verified against their RECORD: apache-tvm (the installed package on
    the host's architecture, else the same wheel :func:`runtime_libraries` fetched) and
    nvidia-cuda-runtime (pinned, fetched once into the cache, or taken from ``wheels_dir``).
    """
    say = progress or (lambda _msg: None)
    if arch not in ARCHES:
        raise RuntimeLibrariesError(f"unsupported architecture {arch!r}: use one of {', '.join(ARCHES)}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    source = Path(wheels_dir) if wheels_dir is not None else cache / "wheels"
    tvm_version = _installed_version("apache-tvm")
    out_dir = cache / f"{arch}-cuda-tvm{tvm_version}-cudart{CUDART_VERSION}"
    files: dict[str, Path] = {}
    if arch == host_arch():
        dist = md.distribution("apache-tvm")
        path = Path(str(dist.locate_file(TVM_CUDA_MEMBER))).resolve()
        if not path.is_file():
            raise MissingDependencyError(
                f"apache-tvm {tvm_version} here has no {TVM_CUDA_MEMBER}; GPU bundles need the "
                "PyPI apache-tvm wheel, which ships TVM's CUDA runtime"
            )
        files["libtvm_runtime_cuda.so"] = path
    else:
        runtime_libraries(arch, wheels_dir=wheels_dir, cache_dir=cache_dir, progress=progress)
        wheel = _find_wheel(source, "apache_tvm", tvm_version, arch)
        if wheel is None:
            raise RuntimeLibrariesError(f"no manylinux {arch} apache-tvm {tvm_version} wheel in {source}")
        files["libtvm_runtime_cuda.so"] = _verified_member(
            wheel, TVM_CUDA_MEMBER, out_dir / "libtvm_runtime_cuda.so", say)
    cudart = _fetch_wheel(f"{CUDART_DIST}=={CUDART_VERSION}", "nvidia_cuda_runtime", CUDART_VERSION,
                          arch, source, wheels_dir, say)
    files["libcudart.so.13"] = _verified_member(cudart, CUDART_MEMBER, out_dir / "libcudart.so.13", say)
    return files
