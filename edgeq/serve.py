"""Device side of remote testing: ``edgeq serve``, a TVM RPC server on the thin runtime.

The listener is plain stdlib sockets: it does TVM's RPC handshake (magic 0xFF271 + key), checks
the shared secret, registers with a TVM tracker if asked, and forks one child per session. The
child opens the TVM runtime through cffi, registers the hooks TVM's RPC needs
(``tvm.rpc.server.workpath`` / ``load_module``) and edgeq's device functions
(``edgeq.device_info``, ``edgeq.load_bundle``, ``edgeq.run``, ``edgeq.benchmark``), then hands the
socket to the runtime's ``rpc.ServerLoop``. Imports nothing from ``tvm`` or edgeq's host side.

Security: RPC runs whatever a connected client uploads. The token only decides who may
connect; nothing is encrypted (tunnel over SSH on untrusted networks).
"""
from __future__ import annotations

import hashlib
import hmac
import io
import ipaddress
import json
import os
import platform
import random
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import cffi
import numpy as np

from . import __version__
from .errors import EdgeqError, RemoteError

RPC_MAGIC = 0xFF271
RPC_CODE_SUCCESS = RPC_MAGIC
RPC_CODE_MISMATCH = RPC_MAGIC + 2
TRACKER_MAGIC = 0x2F271
TRACKER_SUCCESS, TRACKER_PUT, TRACKER_REQUEST, TRACKER_UPDATE_INFO = 0, 3, 4, 5
TRACKER_SUMMARY, TRACKER_PENDING = 6, 7

DEFAULT_PORT = 9090
TOKEN_ENV = "EDGEQ_RPC_TOKEN"
HANDSHAKE_SECONDS = 10.0
MAX_KEY_BYTES = 4096
FFI_LIBRARY, RUNTIME_LIBRARY = "libtvm_ffi.so", "libtvm_runtime.so"


# -- latency statistics (shared by `edgeq bench` and remote tests) ---------------------------
@dataclass(frozen=True)
class Latency:
    """Latency percentiles in milliseconds over ``repeat`` runs."""

    repeat: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float

    @classmethod
    def from_seconds(cls, seconds: Sequence[float]) -> "Latency":
        if not seconds:
            raise ValueError("no timings")
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        p50, p90, p99 = (float(np.percentile(ms, q)) for q in (50, 90, 99))
        return cls(len(ms), p50, p90, p99, float(ms.mean()), float(ms.min()))

    def __str__(self) -> str:
        return (f"p50 {self.p50_ms:.3f} ms  p90 {self.p90_ms:.3f} ms  p99 {self.p99_ms:.3f} ms  "
                f"(min {self.min_ms:.3f}, mean {self.mean_ms:.3f}, {self.repeat} runs)")


def benchmark_bundle(bundle: str | os.PathLike[str], repeat: int = 50, warmup: int = 5) -> Latency:
    """Latency of a bundle on this machine (what ``edgeq bench`` prints)."""
    from .predictor import load

    return Latency.from_seconds(load(bundle).benchmark(repeat=repeat, warmup=warmup))


# -- tensors on the wire: numpy .npz, no pickles ---------------------------------------------
def pack_arrays(arrays: Sequence[np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, *[np.ascontiguousarray(a) for a in arrays])
    return buffer.getvalue()


def unpack_arrays(data: bytes) -> list[np.ndarray]:
    with np.load(io.BytesIO(bytes(data)), allow_pickle=False) as archive:
        return [archive[f"arr_{i}"] for i in range(len(archive.files))]


# -- the runtime the server runs ---------------------------------------------------------------
def _cache_dir() -> Path:
    if os.environ.get("EDGEQ_CACHE_DIR"):
        return Path(os.environ["EDGEQ_CACHE_DIR"]).expanduser() / "serve-runtime"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "edgeq" / "serve-runtime"


def _runtime_identity(folder: Path) -> str:
    """The runtime build's identity, computed as the packager writes it into manifests."""
    from .bundle import sha256_file

    digests = "".join(sha256_file(folder / name) for name in sorted((FFI_LIBRARY, RUNTIME_LIBRARY)))
    return hashlib.sha256(digests.encode()).hexdigest()


@dataclass(frozen=True)
class ServerRuntime:
    """The TVM runtime libraries a server session opens."""

    folder: Path
    identity: str


def resolve_runtime(source: str | os.PathLike[str] | None) -> ServerRuntime:
    """The runtime from a bundle, a folder with the two libraries, or the last one used.

    A bundle's runtime is copied into the cache, so later ``edgeq serve`` calls need no
    ``--runtime``; bundles tested through the server must carry this same runtime.
    """
    cache = _cache_dir()
    if source is None:
        current = cache / "current"
        if current.is_file():
            folder = cache / current.read_text().strip()
            if (folder / RUNTIME_LIBRARY).is_file() and (folder / FFI_LIBRARY).is_file():
                return ServerRuntime(folder, folder.name)
        raise RemoteError(
            "edgeq serve needs the TVM runtime once: pass --runtime MODEL.edgeq (any bundle packaged "
            "for this device) or a folder holding libtvm_ffi.so and libtvm_runtime.so"
        )
    path = Path(source)
    if path.is_dir():
        if not ((path / RUNTIME_LIBRARY).is_file() and (path / FFI_LIBRARY).is_file()):
            raise RemoteError(f"{path} does not hold {FFI_LIBRARY} and {RUNTIME_LIBRARY}")
        return ServerRuntime(path.resolve(), _runtime_identity(path))
    from .bundle import read_bundle

    bundle = read_bundle(path)
    identity = bundle.manifest.runtime.sha256
    folder = cache / identity
    if not (folder / RUNTIME_LIBRARY).is_file():
        staging = Path(tempfile.mkdtemp(prefix="runtime-", dir=_ensure(cache)))
        for name in (FFI_LIBRARY, RUNTIME_LIBRARY):
            member = f"runtime/{name}"
            if member not in bundle.contents:
                raise RemoteError(f"{path} carries no {member}")
            (staging / name).write_bytes(bundle.contents[member])
        try:
            os.replace(staging, folder)
        except OSError:  # another server won the race
            shutil.rmtree(staging, ignore_errors=True)
    (cache / "current").write_text(identity)
    return ServerRuntime(folder, identity)


def _ensure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# -- what a session offers the client ---------------------------------------------------------
def device_info(runtime_identity: str = "") -> dict[str, Any]:
    """What the host checks before uploading: architecture, C library, CPU, versions."""
    from .compat import cpu_features, glibc_version
    from .devices import host_arch

    glibc = glibc_version()
    features = cpu_features()
    return {
        "arch": host_arch(),
        "hostname": socket.gethostname(),
        "glibc": ".".join(map(str, glibc)) if glibc else None,
        "cpu_count": os.cpu_count() or 1,
        "cpu_features": sorted(features) if features is not None else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "edgeq": __version__,
        "runtime": runtime_identity,
    }


class DeviceService:
    """One session's state: its work folder and the bundles it loaded."""

    def __init__(self, workdir: Path, runtime_identity: str) -> None:
        self.workdir = workdir
        self.runtime_identity = runtime_identity
        self._predictors: dict[int, Any] = {}

    def workpath(self, name: str) -> str:
        path = (self.workdir / name).resolve()
        if self.workdir.resolve() not in (path, *path.parents):
            raise RemoteError(f"{name!r} is outside the session folder")
        return str(path)

    def info(self) -> str:
        return json.dumps(device_info(self.runtime_identity))

    def load_bundle(self, name: str, num_threads: int = 0) -> int:
        from .predictor import load

        predictor = load(self.workpath(name), num_threads=num_threads or None)
        handle = len(self._predictors) + 1
        self._predictors[handle] = predictor
        return handle

    def _predictor(self, handle: int) -> Any:
        if handle not in self._predictors:
            raise RemoteError(f"no bundle loaded under handle {handle}")
        return self._predictors[handle]

    def run(self, handle: int, inputs: bytes) -> bytes:
        return pack_arrays(self._predictor(handle).run(unpack_arrays(inputs)))

    def benchmark(self, handle: int, repeat: int, warmup: int) -> str:
        return json.dumps(self._predictor(handle).benchmark(repeat=int(repeat), warmup=int(warmup)))

    def unload(self, handle: int) -> None:
        self._predictors.pop(handle, None)


def _run_session(fd: int, runtime: ServerRuntime) -> None:
    """In the session child: open the runtime, register the functions, serve until the client leaves."""
    from .runtime import load_runtime

    workdir = Path(tempfile.mkdtemp(prefix="edgeq-rpc-"))
    try:
        os.chdir(workdir)
        library = load_runtime(runtime.folder, runtime.identity)
        service = DeviceService(workdir, runtime.identity)
        from .runtime.globals import GlobalRegistry

        registry = GlobalRegistry(library)
        load_module = library.get_global("ffi.ModuleLoadFromFile")
        registry.register("tvm.rpc.server.workpath", service.workpath)
        registry.register("tvm.rpc.server.load_module", lambda name: load_module(service.workpath(name)))
        registry.register("edgeq.device_info", service.info)
        registry.register("edgeq.load_bundle", service.load_bundle)
        registry.register("edgeq.run", service.run)
        registry.register("edgeq.benchmark", service.benchmark)
        registry.register("edgeq.unload", service.unload)
        library.get_global("rpc.ServerLoop")(fd)
    finally:
        os.chdir("/")
        shutil.rmtree(workdir, ignore_errors=True)


# -- the listener ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServeOptions:
    """How ``edgeq serve`` listens."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0 picks a free port (printed)
    key: str = ""  # device key, e.g. "rpi4"; clients of a tracker ask for devices by it
    tracker: tuple[str, int] | None = None
    token: str | None = None  # shared secret; required when not bound to loopback
    runtime: str | None = None  # bundle or folder with the TVM runtime (default: the last one)
    custom_addr: str | None = None  # address the tracker hands to clients (default: as it sees us)
    session_timeout: float | None = None  # longest session the server allows, seconds


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_address(text: str, default_port: int | None = None) -> tuple[str, int]:
    """'HOST:PORT' (or '[v6]:PORT') to a tuple."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        if default_port is None:
            raise RemoteError(f"{text!r} is not HOST:PORT")
        return text.strip("[]"), default_port
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise RemoteError(f"{text!r} is not HOST:PORT") from None


def _recvall(sock: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(min(size - got, 65536))
        if not chunk:
            raise ConnectionError("connection closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def send_json(sock: socket.socket, value: Any) -> None:
    data = json.dumps(value).encode()
    sock.sendall(struct.pack("<i", len(data)) + data)


def recv_json(sock: socket.socket) -> Any:
    size = struct.unpack("<i", _recvall(sock, 4))[0]
    return json.loads(_recvall(sock, size).decode())


def tracker_connect(address: tuple[str, int], timeout: float = 10.0) -> socket.socket:
    """A connection to a TVM tracker, after its magic handshake."""
    sock = socket.create_connection(address, timeout=timeout)
    try:
        sock.sendall(struct.pack("<i", TRACKER_MAGIC))
        if struct.unpack("<i", _recvall(sock, 4))[0] != TRACKER_MAGIC:
            raise RemoteError(f"{address[0]}:{address[1]} is not a TVM RPC tracker")
    except BaseException:
        sock.close()
        raise
    return sock


class _Tracker:
    """This server's registration with a tracker (TVM's server protocol)."""

    PING_SECONDS = 2.0
    UNMATCHED_SECONDS = 4.0

    def __init__(self, options: ServeOptions, port: int, say: Callable[[str], None]) -> None:
        self.options, self.port, self.say = options, port, say
        self.sock: socket.socket | None = None
        self.matchkey = options.key
        self._unmatched = 0

    def ensure(self) -> None:
        if self.sock is not None:
            return
        assert self.options.tracker is not None
        self.sock = tracker_connect(self.options.tracker)
        info = {"key": "server:" + self.options.key, "addr": [self.options.custom_addr, self.port]}
        send_json(self.sock, [TRACKER_UPDATE_INFO, info])
        if recv_json(self.sock) != TRACKER_SUCCESS:
            raise RemoteError("the tracker refused this server's registration")
        self.put()
        host, port = self.options.tracker
        self.say(f"registered with tracker {host}:{port} under key {self.options.key!r}")

    def put(self) -> None:
        assert self.sock is not None
        self.matchkey = f"{self.options.key}:{random.random()}"
        send_json(self.sock, [TRACKER_PUT, self.options.key, [self.port, self.matchkey], self.options.custom_addr])
        if recv_json(self.sock) != TRACKER_SUCCESS:
            raise RemoteError("the tracker refused this server")

    def ping(self) -> None:
        """Between connections: re-offer the device if a client took its key and never came."""
        assert self.sock is not None
        send_json(self.sock, [TRACKER_PENDING])
        if self.matchkey in recv_json(self.sock):
            self._unmatched = 0
            return
        self._unmatched += 1
        if self._unmatched * self.PING_SECONDS > self.UNMATCHED_SECONDS + self.PING_SECONDS:
            self._unmatched = 0
            self.put()

    def drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None


class RPCServer:
    """``edgeq serve``: accepts authenticated TVM RPC clients, one session at a time."""

    def __init__(self, options: ServeOptions, say: Callable[[str], None] | None = None) -> None:
        self.options = options
        self.say = say or (lambda message: print(f"edgeq serve: {message}", file=sys.stderr, flush=True))
        self.token = options.token if options.token is not None else os.environ.get(TOKEN_ENV) or None
        if not is_loopback(options.host):
            if not self.token:
                raise RemoteError(
                    f"refusing to listen on {options.host}: RPC runs whatever a client uploads, so a "
                    f"server reachable from the network needs a shared secret (--token or ${TOKEN_ENV})"
                )
            self.say(f"WARNING: listening on {options.host}: any client with the token can run code "
                     "on this machine; traffic is not encrypted (use an SSH tunnel on untrusted networks)")
        self.runtime = resolve_runtime(options.runtime)
        family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((options.host, options.port))
        except OSError as error:
            self.sock.close()
            raise RemoteError(f"cannot listen on {options.host}:{options.port}: {error.strerror}") from None
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self._tracker = _Tracker(options, self.port, self.say) if options.tracker else None
        self._child: int | None = None

    # -- handshake --------------------------------------------------------------------------
    def _accept_key(self, key: str) -> bool:
        if self._tracker is not None:
            return key == f"client:{self._tracker.matchkey}"
        return key in ("client:", f"client:{self.options.key}")

    def handshake(self, conn: socket.socket) -> dict[str, str] | None:
        """TVM's handshake plus the token; returns the client's options or None if refused."""
        conn.settimeout(HANDSHAKE_SECONDS)
        first = conn.recv(4, socket.MSG_WAITALL)
        if not first:
            raise _Probe()  # connected and left without a word: a reachability check
        if len(first) < 4 or struct.unpack("<i", first)[0] != RPC_MAGIC:
            return None
        size = struct.unpack("<i", _recvall(conn, 4))[0]
        if not 0 <= size <= MAX_KEY_BYTES:
            return None
        words = _recvall(conn, size).decode(errors="replace").split()
        options = dict(word[1:].split("=", 1) for word in words[1:] if word.startswith("-") and "=" in word)
        given = options.get("token", "")
        token_ok = not self.token or hmac.compare_digest(given.encode(), self.token.encode())
        if not words or not self._accept_key(words[0]) or not token_ok:
            conn.sendall(struct.pack("<i", RPC_CODE_MISMATCH))
            return None
        server_key = f"server:{self.options.key}"
        conn.sendall(struct.pack("<ii", RPC_CODE_SUCCESS, len(server_key)) + server_key.encode())
        conn.settimeout(None)
        return options

    # -- sessions ---------------------------------------------------------------------------
    def _session(self, conn: socket.socket, address: Any, options: dict[str, str]) -> None:
        limits = [t for t in (self.options.session_timeout, _float(options.get("timeout"))) if t]
        timeout = min(limits) if limits else None
        pid = os.fork()
        if pid == 0:  # the session child
            code = 0
            try:
                self.sock.close()
                if self._tracker is not None and self._tracker.sock is not None:
                    self._tracker.sock.close()
                _die_with_parent()
                _run_session(conn.detach(), self.runtime)
            except BaseException as error:  # noqa: BLE001
                print(f"edgeq serve: session failed: {error}", file=sys.stderr, flush=True)
                code = 1
            finally:
                os._exit(code)
        conn.close()
        self._child = pid
        self.say(f"session from {address[0]} (pid {pid})")
        deadline = None if timeout is None else time.monotonic() + timeout
        status = None
        while status is None:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = raw
            elif deadline is not None and time.monotonic() > deadline:
                self.say(f"session from {address[0]} ran past {timeout:g} s; ending it")
                os.kill(pid, signal.SIGKILL)
                status = os.waitpid(pid, 0)[1]
            else:
                time.sleep(0.05)
        self._child = None
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) != signal.SIGKILL:
            self.say(f"session from {address[0]} crashed (signal {os.WTERMSIG(status)})")
        else:
            self.say(f"session from {address[0]} ended")

    def serve_forever(self) -> None:
        host = self.options.host
        self.say(f"listening on {host}:{self.port} (key {self.options.key!r}, "
                 f"token {'required' if self.token else 'off'}, runtime {self.runtime.identity[:12]})")
        try:
            while True:
                self._serve_one()
        finally:
            self.close()

    def _serve_one(self) -> None:
        if self._tracker is not None:
            try:
                self._tracker.ensure()
                ready, _, _ = select.select([self.sock], [], [], self._tracker.PING_SECONDS)
                if not ready:
                    self._tracker.ping()
                    return
            except (OSError, ValueError, struct.error) as error:
                self.say(f"tracker connection lost ({error}); retrying")
                self._tracker.drop()
                time.sleep(1.0)
                return
        conn, address = self.sock.accept()
        try:
            options = self.handshake(conn)
        except _Probe:
            conn.close()
            return
        except (OSError, ValueError, struct.error):
            options = None
        if options is None:
            self.say(f"refused a client from {address[0]}: wrong key or token, or not a TVM RPC client")
            conn.close()
            return
        self._session(conn, address, options)
        if self._tracker is not None and self._tracker.sock is not None:
            try:
                self._tracker.put()  # offer this device again
            except (OSError, ValueError, struct.error):
                self._tracker.drop()

    def close(self) -> None:
        if self._child is not None:
            try:
                os.kill(self._child, signal.SIGKILL)
                os.waitpid(self._child, 0)
            except OSError:
                pass
        if self._tracker is not None:
            self._tracker.drop()
        self.sock.close()


class _Probe(Exception):
    """A client connected and closed without a handshake."""


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _die_with_parent() -> None:
    """Linux: end the session child if the server dies (prctl PR_SET_PDEATHSIG)."""
    try:
        ffi = cffi.FFI()
        ffi.cdef("int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4, unsigned long arg5);")
        ffi.dlopen(None).prctl(1, signal.SIGKILL, 0, 0, 0)
    except Exception:  # noqa: BLE001 - best effort off Linux
        pass


def serve(options: ServeOptions, say: Callable[[str], None] | None = None) -> None:
    """Run ``edgeq serve`` until interrupted."""
    server = RPCServer(options, say)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever()


__all__ = [
    "DEFAULT_PORT",
    "DeviceService",
    "Latency",
    "RPCServer",
    "ServeOptions",
    "ServerRuntime",
    "TOKEN_ENV",
    "benchmark_bundle",
    "device_info",
    "pack_arrays",
    "parse_address",
    "resolve_runtime",
    "serve",
    "unpack_arrays",
]
