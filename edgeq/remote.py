"""Host side of remote testing: run, check and time a bundle on devices over TVM RPC.

``RemoteSession`` talks to one ``edgeq serve`` device (directly or through a TVM tracker);
``remote_test`` uploads a bundle, runs pictures there and in the host's TFLite reference
interpreter, and reports agreement and on-device latency, for one device or a whole fleet.
Needs the ``tvm`` package (``pip install 'edgeq[host]'``).
"""
from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .bundle import Bundle, read_bundle
from .errors import EdgeqError, MissingDependencyError, RemoteError
from .manifest import Manifest
from .serve import (
    TOKEN_ENV,
    TRACKER_REQUEST,
    TRACKER_SUCCESS,
    TRACKER_SUMMARY,
    Latency,
    pack_arrays,
    parse_address,
    recv_json,
    send_json,
    tracker_connect,
    unpack_arrays,
)

DEFAULT_TIMEOUT = 120.0
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _rpc() -> Any:
    try:
        from tvm import rpc
    except ImportError:
        raise MissingDependencyError(
            "remote testing needs the tvm package on this computer: pip install 'edgeq[host]'"
        ) from None
    return rpc


def _explain(error: BaseException, where: str) -> RemoteError:
    """One clear line for an RPC failure (TVM's messages carry C++ backtraces)."""
    text = re.sub(r"-token=\S+", "-token=***", str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    edgeq_lines = [line[line.index("edgeq: ") + 7:] for line in lines if "edgeq: " in line]
    lowered = text.lower()
    if edgeq_lines:
        message = edgeq_lines[-1]
    elif "matches key" in lowered or "mismatch" in lowered:
        message = (f"{where} refused the connection: wrong device key or token "
                   f"(pass --token or set ${TOKEN_ENV} to the server's secret)")
    elif "refused" in lowered or "connect" in lowered and "fail" in lowered:
        message = f"cannot connect to {where}: is `edgeq serve` running there? ({lines[-1] if lines else text})"
    elif any(word in lowered for word in ("closed", "reset", "broken pipe", "eof", "shutdown", "rpc session")):
        message = f"lost the connection to {where} (the server stopped, crashed or ended the session)"
    else:
        message = f"{where}: {lines[-1] if lines else type(error).__name__}"
    return RemoteError(message)


@dataclass(frozen=True)
class DeviceInfo:
    """What an ``edgeq serve`` device reports about itself."""

    arch: str
    hostname: str
    glibc: str | None
    cpu_count: int
    cpu_features: tuple[str, ...] | None
    python: str
    edgeq: str
    runtime: str

    @classmethod
    def from_json(cls, text: str) -> "DeviceInfo":
        data = json.loads(text)
        features = data.get("cpu_features")
        return cls(
            arch=str(data["arch"]), hostname=str(data.get("hostname", "?")), glibc=data.get("glibc"),
            cpu_count=int(data.get("cpu_count", 1)),
            cpu_features=None if features is None else tuple(features),
            python=str(data.get("python", "?")), edgeq=str(data.get("edgeq", "?")),
            runtime=str(data.get("runtime", "")),
        )


def check_compatible(manifest: Manifest, info: DeviceInfo, where: str) -> None:
    """Raise RemoteError unless the device can run the bundle (checked before uploading)."""
    target = manifest.target
    if target.arch != info.arch:
        raise RemoteError(
            f"the bundle was compiled for {target.arch} (device {target.device!r}) but {where} "
            f"({info.hostname}) is {info.arch}; package it with --device for that machine"
        )
    if info.cpu_features is not None:
        missing = [f for f in target.cpu_features if f not in info.cpu_features]
        if missing:
            raise RemoteError(f"{where} ({info.hostname}) lacks CPU features {', '.join(missing)} "
                              f"that device {target.device!r} needs")
    floor = manifest.runtime.glibc_floor
    if floor and info.glibc:
        as_tuple = lambda v: tuple(int(p) for p in v.split(".") if p.isdigit())  # noqa: E731
        if as_tuple(info.glibc) < as_tuple(floor):
            raise RemoteError(f"{where} has glibc {info.glibc}; the bundle's runtime needs {floor}")
    if info.runtime and info.runtime != manifest.runtime.sha256:
        raise RemoteError(
            f"{where} serves TVM runtime {info.runtime[:12]} but the bundle carries "
            f"{manifest.runtime.sha256[:12]} (TVM {manifest.runtime.tvm_version}); restart the "
            "server there with `edgeq serve --runtime THIS.edgeq`"
        )


# -- one device ----------------------------------------------------------------------------
class RemoteSession:
    """A session with one ``edgeq serve`` device: connect, upload, run, benchmark, close.

    ``remote`` is "HOST:PORT"; ``matchkey`` is the key a tracker handed out (else ``key``).
    ``timeout`` bounds the session on the server side (it ends sessions that run longer).
    """

    def __init__(self, remote: str | tuple[str, int], *, key: str = "", token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, matchkey: str | None = None) -> None:
        self.address = parse_address(remote) if isinstance(remote, str) else (remote[0], int(remote[1]))
        self.where = f"{self.address[0]}:{self.address[1]}"
        self.key = matchkey if matchkey is not None else key
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.timeout = timeout
        self._session: Any = None
        self._functions: dict[str, Any] = {}
        self._handle: int | None = None
        self.manifest: Manifest | None = None
        self.info: DeviceInfo | None = None

    def __enter__(self) -> "RemoteSession":
        return self.connect()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, name: str, *args: Any) -> Any:
        if self._session is None:
            raise RemoteError("the session is not connected")
        try:
            if name not in self._functions:
                function = self._session.get_function(name)
                if function is None:
                    raise RemoteError(f"{self.where} has no function {name}: is it `edgeq serve` "
                                      "from the same edgeq version?")
                self._functions[name] = function
            return self._functions[name](*args)
        except EdgeqError:
            raise
        except Exception as error:  # noqa: BLE001 - TVM raises many kinds
            raise _explain(error, self.where) from None

    def connect(self) -> "RemoteSession":
        """Open the session and read the device's description."""
        rpc = _rpc()
        key = self.key + (f" -token={self.token}" if self.token else "")
        self._probe()
        try:
            self._session = rpc.connect(self.address[0], self.address[1], key=key,
                                        session_timeout=max(1, int(self.timeout)) if self.timeout else 0)
        except Exception as error:  # noqa: BLE001
            raise _explain(error, self.where) from None
        self.info = DeviceInfo.from_json(self._call("edgeq.device_info"))
        return self

    def _probe(self) -> None:
        """Fail fast and clearly when nothing listens (TVM's connect retries and backtraces)."""
        try:
            socket.create_connection(self.address, timeout=min(10.0, self.timeout or 10.0)).close()
        except OSError as error:
            raise RemoteError(
                f"cannot connect to {self.where} ({error.strerror or error}): is `edgeq serve` running "
                "there, and is the port reachable (SSH tunnel)?"
            ) from None

    def upload(self, bundle: str | os.PathLike[str] | Bundle, num_threads: int = 0) -> int:
        """Check the bundle fits the device, upload it and load it there; returns its handle."""
        bundle = bundle if isinstance(bundle, Bundle) else read_bundle(bundle)
        assert self.info is not None, "connect() first"
        check_compatible(bundle.manifest, self.info, self.where)
        name = f"{bundle.manifest.source.sha256[:12]}{Path(bundle.path).suffix or '.edgeq'}"
        self._call("tvm.rpc.server.upload", name, bytearray(Path(bundle.path).read_bytes()))
        self._handle = int(self._call("edgeq.load_bundle", name, int(num_threads)))
        self.manifest = bundle.manifest
        return self._handle

    def run(self, tensors: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run raw input tensors on the device; returns its raw outputs."""
        if self._handle is None:
            raise RemoteError("upload() a bundle first")
        if isinstance(tensors, np.ndarray):
            tensors = [tensors]
        data = self._call("edgeq.run", self._handle, bytearray(pack_arrays(list(tensors))))
        return unpack_arrays(bytes(data))

    def benchmark(self, repeat: int = 50, warmup: int = 5) -> Latency:
        """Latency of the loaded bundle, timed on the device itself."""
        if self._handle is None:
            raise RemoteError("upload() a bundle first")
        return Latency.from_seconds(json.loads(self._call("edgeq.benchmark", self._handle, int(repeat), int(warmup))))

    def close(self) -> None:
        self._functions.clear()
        self._session = None  # dropping the last reference closes the socket


# -- finding devices through a tracker -------------------------------------------------------
@dataclass(frozen=True)
class Lease:
    """A device a tracker handed out: where it listens and the one-time key to present."""

    host: str
    port: int
    matchkey: str


def tracker_free_devices(tracker: str | tuple[str, int], key: str, timeout: float = 10.0) -> tuple[list[Lease], socket.socket]:
    """Request every free device under ``key``; keep the returned socket open while using them."""
    address = parse_address(tracker) if isinstance(tracker, str) else tracker
    where = f"{address[0]}:{address[1]}"
    try:
        sock = tracker_connect(address, timeout)
        send_json(sock, [TRACKER_SUMMARY])
        reply = recv_json(sock)
    except EdgeqError:
        raise
    except (OSError, ValueError) as error:
        raise RemoteError(f"cannot reach the tracker at {where}: {error}") from None
    queue = reply[1]["queue_info"].get(key, {}) if reply and reply[0] == TRACKER_SUCCESS else {}
    free = int(queue.get("free", 0))
    if free == 0:
        sock.close()
        registered = sum(1 for s in reply[1]["server_info"] if s.get("key") == f"server:{key}")
        raise RemoteError(f"the tracker at {where} has no free device under key {key!r} "
                          f"({registered} registered, all busy)" if registered else
                          f"the tracker at {where} has no device registered under key {key!r}")
    leases: list[Lease] = []
    try:
        for _ in range(free):
            send_json(sock, [TRACKER_REQUEST, key, "", 1])
        sock.settimeout(min(timeout, 5.0))
        for _ in range(free):
            value = recv_json(sock)
            if value[0] == TRACKER_SUCCESS:
                host, port, matchkey = value[1]
                leases.append(Lease(str(host), int(port), str(matchkey)))
    except (OSError, ValueError):
        pass  # a device went busy meanwhile: test the ones granted
    if not leases:
        sock.close()
        raise RemoteError(f"the tracker at {where} granted no device under key {key!r}")
    return leases, sock


# -- the test --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Thresholds:
    """The least agreement a passing bundle shows against the reference interpreter."""

    max_steps: float = 1.0  # largest difference in quantization steps (absolute for float outputs)
    min_identical: float = 0.9  # share of output elements exactly equal
    min_top1: float = 1.0  # share of pictures whose top-1 class matches


@dataclass(frozen=True)
class PictureResult:
    picture: str
    max_steps: float
    identical: float
    top1_device: int
    top1_reference: int

    @property
    def top1_agrees(self) -> bool:
        return self.top1_device == self.top1_reference


@dataclass
class DeviceResult:
    """The outcome on one device; ``passed`` is False on error or below the thresholds."""

    device: str
    thresholds: Thresholds
    info: DeviceInfo | None = None
    pictures: list[PictureResult] = field(default_factory=list)
    latency: Latency | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def max_steps(self) -> float:
        return max((p.max_steps for p in self.pictures), default=0.0)

    @property
    def identical(self) -> float:
        return float(np.mean([p.identical for p in self.pictures])) if self.pictures else 0.0

    @property
    def top1_agreement(self) -> float:
        return float(np.mean([p.top1_agrees for p in self.pictures])) if self.pictures else 0.0

    @property
    def agrees(self) -> bool:
        t = self.thresholds
        return bool(self.pictures) and self.max_steps <= t.max_steps and self.identical >= t.min_identical \
            and self.top1_agreement >= t.min_top1

    @property
    def passed(self) -> bool:
        return self.error is None and self.agrees

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(max_steps=self.max_steps, identical=self.identical, top1_agreement=self.top1_agreement,
                    agrees=self.agrees if self.error is None else False, passed=self.passed)
        for picture, result in zip(data["pictures"], self.pictures):
            picture["top1_agrees"] = result.top1_agrees
        del data["thresholds"]
        if data["info"]:
            data["info"].pop("cpu_features", None)
        return data


@dataclass
class RemoteTestReport:
    """A bundle tested on one device or a fleet: one DeviceResult per device."""

    bundle: str
    model: str
    thresholds: Thresholds
    devices: list[DeviceResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.devices) and all(d.passed for d in self.devices)

    @property
    def errors(self) -> list[str]:
        return [d.error for d in self.devices if d.error]

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "model": self.model, "thresholds": asdict(self.thresholds),
                "passed": self.passed, "devices": [d.to_dict() for d in self.devices]}


def compare_outputs(device: Sequence[np.ndarray], reference: Sequence[np.ndarray], manifest: Manifest,
                    picture: str) -> PictureResult:
    """Agreement of one picture's outputs: steps apart, identical share, top-1 class."""
    steps, same, total = 0.0, 0, 0
    for ours, theirs in zip(device, reference):
        ours, theirs = np.asarray(ours), np.asarray(theirs).reshape(np.shape(ours))
        if np.issubdtype(ours.dtype, np.integer):
            diff = np.abs(ours.astype(np.int64) - theirs.astype(np.int64)).astype(np.float64)
        else:
            diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
        steps = max(steps, float(diff.max()) if diff.size else 0.0)
        same += int(np.count_nonzero(ours == theirs))
        total += ours.size
    index = manifest.postprocess.output_index
    return PictureResult(
        picture=picture, max_steps=steps, identical=same / total if total else 1.0,
        top1_device=int(np.argmax(np.asarray(device[index]).reshape(-1))),
        top1_reference=int(np.argmax(np.asarray(reference[index]).reshape(-1))),
    )


def _inputs(manifest: Manifest, images: Sequence[Path], random_count: int) -> list[tuple[str, list[np.ndarray]]]:
    from .preprocess import picture_to_tensor

    if images:
        if len(manifest.inputs) != 1:
            raise RemoteError("pictures work with single-input models; omit --images to use random tensors")
        return [(p.name, [picture_to_tensor(p, manifest.inputs[0], manifest.preprocess)]) for p in images]
    rng = np.random.default_rng(0)
    cases = []
    for i in range(random_count):
        tensors = []
        for spec in manifest.inputs:
            dtype = np.dtype(spec.dtype)
            if np.issubdtype(dtype, np.integer):
                info = np.iinfo(dtype)
                tensors.append(rng.integers(info.min, int(info.max) + 1, size=spec.shape, dtype=dtype))
            else:
                tensors.append(rng.standard_normal(spec.shape).astype(dtype))
        cases.append((f"random-{i}", tensors))
    return cases


def list_pictures(folder: str | os.PathLike[str]) -> list[Path]:
    path = Path(folder)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise RemoteError(f"{path}: no such picture or folder")
    pictures = sorted(p for p in path.iterdir() if p.suffix.lower() in PICTURE_SUFFIXES)
    if not pictures:
        raise RemoteError(f"{path} holds no pictures ({', '.join(PICTURE_SUFFIXES)})")
    return pictures


def _test_one(session: RemoteSession, bundle: Bundle, cases: list[tuple[str, list[np.ndarray]]],
              expected: list[list[np.ndarray]], repeat: int, report: DeviceResult) -> None:
    with session:
        report.info = session.info
        session.upload(bundle)
        for (name, tensors), reference in zip(cases, expected):
            report.pictures.append(compare_outputs(session.run(tensors), reference, bundle.manifest, name))
        if repeat > 0:
            report.latency = session.benchmark(repeat=repeat, warmup=min(5, repeat))


def _run_bounded(work: Any, timeout: float | None, report: DeviceResult) -> None:
    """Run ``work()`` on a daemon thread; a hung device cannot hold the caller past ``timeout``."""
    outcome: list[BaseException] = []

    def target() -> None:
        try:
            work()
        except BaseException as error:  # noqa: BLE001
            outcome.append(error)

    thread = threading.Thread(target=target, daemon=True, name=f"remote-test {report.device}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        report.error = f"{report.device}: no answer within {timeout:g} s (--timeout); the device is hung or too slow"
    elif outcome:
        error = outcome[0]
        report.error = str(error) if isinstance(error, EdgeqError) else f"{report.device}: {_explain(error, report.device)}"


def remote_test(
    bundle: str | os.PathLike[str],
    *,
    remote: str | None = None,
    tracker: str | None = None,
    key: str = "",
    model: str | os.PathLike[str] | None = None,
    images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    repeat: int = 20,
    token: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    thresholds: Thresholds = Thresholds(),
    random_inputs: int = 4,
) -> RemoteTestReport:
    """Test ``bundle`` on one device (``remote``) or every free one under ``key`` at ``tracker``.

    Each device runs the pictures' pre-processed tensors; the source model runs on the same
    tensors in the host reference interpreter. A device's failure is recorded in its result
    (``error``); failures before any device is reached raise RemoteError.
    """
    from .reference import open_reference

    if (remote is None) == (tracker is None):
        raise RemoteError("give either a device address (--remote HOST:PORT) or a tracker (--tracker HOST:PORT --key KEY)")
    if tracker is not None and not key:
        raise RemoteError("--tracker needs --key, the device key the servers registered under")
    loaded = read_bundle(bundle)
    manifest = loaded.manifest
    model_path = Path(model) if model is not None else Path(bundle).with_name(manifest.source.name)
    if not model_path.is_file():
        raise RemoteError(f"the source model {model_path} is missing; pass --model SOURCE.tflite")
    if images is None:
        pictures: list[Path] = []
    elif isinstance(images, (str, os.PathLike)):
        pictures = list_pictures(images)
    else:
        pictures = [Path(p) for p in images]
    cases = _inputs(manifest, pictures, random_inputs)
    try:
        interpreter = open_reference(model_path)  # TFLite's reference kernels, or onnxruntime for .onnx
        expected = [interpreter.run(tensors) for _, tensors in cases]
    except EdgeqError:
        raise
    except Exception as error:  # noqa: BLE001 - the interpreter raises ValueError/RuntimeError
        raise RemoteError(f"the reference interpreter cannot run {model_path}: {error}") from None
    for (_, tensors), reference in zip(cases, expected):
        shapes = [o.size for o in reference]
        if shapes != [int(np.prod(s.shape)) for s in manifest.outputs]:
            raise RemoteError(f"{model_path} does not produce the bundle's outputs; is it the bundle's source model?")

    tracker_sock = None
    if tracker is not None:
        leases, tracker_sock = tracker_free_devices(tracker, key, timeout=min(timeout, 10.0))
        sessions = [RemoteSession((l.host, l.port), matchkey=l.matchkey, token=token, timeout=timeout) for l in leases]
    else:
        sessions = [RemoteSession(remote, key=key, token=token, timeout=timeout)]
    report = RemoteTestReport(bundle=str(bundle), model=str(model_path), thresholds=thresholds,
                              devices=[DeviceResult(device=s.where, thresholds=thresholds) for s in sessions])

    def one(pair: tuple[RemoteSession, DeviceResult]) -> None:
        session, result = pair
        started = time.perf_counter()
        _run_bounded(lambda: _test_one(session, loaded, cases, expected, repeat, result), timeout, result)
        result.seconds = time.perf_counter() - started

    try:
        with ThreadPoolExecutor(max_workers=max(1, len(sessions))) as pool:
            list(pool.map(one, zip(sessions, report.devices)))
    finally:
        if tracker_sock is not None:
            tracker_sock.close()
    return report


__all__ = [
    "DeviceInfo",
    "DeviceResult",
    "Latency",
    "Lease",
    "PictureResult",
    "RemoteSession",
    "RemoteTestReport",
    "Thresholds",
    "check_compatible",
    "compare_outputs",
    "remote_test",
    "tracker_free_devices",
]
