"""Remote testing over TVM RPC: `edgeq serve` on loopback, `edgeq remote-test` and `edgeq bench`.

Every server and tracker started here binds 127.0.0.1 and is killed at the end of its test.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import edgeq
from conftest import REPO_ROOT, shared_path
from processes import Process
from edgeq.errors import RemoteError

MODEL = "mlperf_tiny_resnet_cifar10_int8.tflite"
PICTURES = ("data", "cifar10-samples")
BOUND = 60  # seconds any failing command may take before it counts as a hang


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """Environment for servers and CLI runs: a private cache, no inherited token."""
    values = dict(os.environ)
    values["EDGEQ_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    values.pop("EDGEQ_RPC_TOKEN", None)
    values["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "tests"), values.get("PYTHONPATH")]))
    return values


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The cifar10 model packaged once for x86_64, its source model copied beside it."""
    model = shared_path("models", "tflite", MODEL)
    folder = tmp_path_factory.mktemp("bundle")
    shutil.copy(model, folder / MODEL)
    out = folder / "cifar.edgeq"
    edgeq.package(model, out, edgeq.PackageOptions(device="x86_64"))
    return out


@pytest.fixture(scope="module")
def tampered_model(bundle: Path) -> Path:
    """The source model with its largest weight buffer reversed: same shapes, other outputs."""
    import tflite

    data = bytearray((bundle.parent / MODEL).read_bytes())
    model = tflite.Model.GetRootAsModel(data, 0)
    buffers = [model.Buffers(i).DataAsNumpy() for i in range(model.BuffersLength())]
    raw = max((b for b in buffers if isinstance(b, np.ndarray)), key=lambda b: b.size).tobytes()
    offset = bytes(data).find(raw)
    assert offset > 0
    data[offset:offset + len(raw)] = raw[::-1]
    path = bundle.parent / "tampered.tflite"
    path.write_bytes(bytes(data))
    return path


def edgeq_cli(*args: str, env: dict[str, str], timeout: float = BOUND) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeq.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


class Server(Process):
    """`edgeq serve` on loopback, port chosen by the system."""

    def __init__(self, bundle: Path, env: dict[str, str], log: Path, *extra: str) -> None:
        args = [sys.executable, "-m", "edgeq.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                "--runtime", str(bundle), *extra]
        super().__init__(args, env, log, "listening on")
        line = next(l for l in self.text().splitlines() if "listening on" in l)
        self.address = line.split("listening on ")[1].split()[0]


@pytest.fixture
def server(bundle, env, tmp_path):
    srv = Server(bundle, env, tmp_path / "server.log")
    yield srv
    srv.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- passing and failing bundles -----------------------------------------------------------------
def test_remote_test_reports_agreement_and_latency(bundle, env, server):
    pictures = shared_path(*PICTURES)
    proc = edgeq_cli("remote-test", str(bundle), "--remote", server.address, "--images", str(pictures),
                     "--repeat", "3", "--json", env=env, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] and len(report["devices"]) == 1
    device = report["devices"][0]
    assert device["error"] is None and device["info"]["arch"] == "x86_64"
    assert len(device["pictures"]) == len([p for p in pictures.iterdir() if p.suffix == ".png"])
    assert device["max_steps"] <= 1 and device["identical"] >= 0.9 and device["top1_agreement"] == 1.0
    latency = device["latency"]
    assert latency["repeat"] == 3 and 0 < latency["p50_ms"] <= latency["p90_ms"] <= latency["p99_ms"]


def test_disagreeing_model_fails_with_its_own_status(bundle, env, server, tampered_model):
    proc = edgeq_cli("remote-test", str(bundle), "--remote", server.address, "--images",
                     str(shared_path(*PICTURES)), "--model", str(tampered_model), "--repeat", "0",
                     env=env, timeout=180)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "FAIL (below thresholds)" in proc.stdout and "<- differs" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_python_api(bundle, server):
    from edgeq.reference import ReferenceInterpreter
    from edgeq.remote import RemoteSession, Thresholds, remote_test

    x = np.random.default_rng(1).integers(-128, 128, size=(1, 32, 32, 3), dtype=np.int8)
    with RemoteSession(server.address, timeout=60) as session:
        assert session.info.arch == "x86_64"
        session.upload(bundle)
        (device_out,) = session.run(x)
        latency = session.benchmark(repeat=2, warmup=1)
    (expected,) = ReferenceInterpreter(bundle.parent / MODEL, kernels="reference").run(x)
    assert device_out.shape == (1, 10) and np.abs(device_out.astype(int) - expected.astype(int)).max() <= 1
    assert latency.repeat == 2 and latency.p50_ms > 0
    report = remote_test(bundle, remote=server.address, repeat=0, thresholds=Thresholds(), timeout=60)
    assert report.passed and len(report.devices[0].pictures) == 4  # random tensors by default


def test_bench(bundle, env):
    proc = edgeq_cli("bench", str(bundle), "--repeat", "3", "--warmup", "1", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["repeat"] == 3 and result["p50_ms"] > 0


# -- fleets ---------------------------------------------------------------------------------
def test_fleet_through_a_tvm_tracker(bundle, env, tmp_path):
    pytest.importorskip("tornado", reason="TVM's tracker needs tornado")
    tracker_code = ("from tvm.rpc.tracker import PopenTrackerServerState as S\n"
                    "s = S('127.0.0.1', 9190, 9390, silent=True)\n"
                    "print('tracker port', s.port, flush=True)\n"
                    "s.thread.join()\n")
    tracker = Process([sys.executable, "-c", tracker_code], env, tmp_path / "tracker.log", "tracker port")
    servers: list[Server] = []
    try:
        port = tracker.text().split("tracker port")[1].split()[0]
        for i in range(2):
            servers.append(Server(bundle, env, tmp_path / f"server{i}.log", "--tracker", f"127.0.0.1:{port}",
                                  "--key", "testpi"))
        deadline = time.monotonic() + 20
        while not all("registered with tracker" in s.text() for s in servers):
            assert time.monotonic() < deadline, [s.text() for s in servers]
            time.sleep(0.1)
        proc = edgeq_cli("remote-test", str(bundle), "--tracker", f"127.0.0.1:{port}", "--key", "testpi",
                         "--repeat", "2", env=env, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        rows = [line for line in proc.stdout.splitlines() if line.startswith("127.0.0.1:")]
        assert sorted(row.split()[0] for row in rows) == sorted(s.address for s in servers)
        assert all(row.endswith("PASS") for row in rows)
        missing = edgeq_cli("remote-test", str(bundle), "--tracker", f"127.0.0.1:{port}", "--key", "nosuch",
                            env=env)
        assert missing.returncode == 1 and "no device registered under key 'nosuch'" in missing.stderr
    finally:
        for srv in servers:
            srv.stop()
        tracker.stop()


# -- failures end quickly with one clear line ----------------------------------------------------
def _assert_clean_failure(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "Traceback" not in output
    for needle in needles:
        assert needle in output, output


def test_server_not_running(bundle, env):
    started = time.monotonic()
    proc = edgeq_cli("remote-test", str(bundle), "--remote", f"127.0.0.1:{free_port()}", env=env)
    _assert_clean_failure(proc, "cannot connect to", "edgeq serve")
    assert time.monotonic() - started < 30


def test_wrong_or_missing_token(bundle, env, tmp_path):
    srv = Server(bundle, env, tmp_path / "server.log", "--token", "right-secret")
    try:
        for extra in (["--token", "wrong-secret"], []):
            proc = edgeq_cli("remote-test", str(bundle), "--remote", srv.address, "--repeat", "0", *extra, env=env)
            _assert_clean_failure(proc, "refused the connection", "token")
            assert "wrong-secret" not in proc.stdout + proc.stderr
        good = edgeq_cli("remote-test", str(bundle), "--remote", srv.address, "--repeat", "0",
                         env={**env, "EDGEQ_RPC_TOKEN": "right-secret"}, timeout=180)
        assert good.returncode == 0, good.stdout + good.stderr
    finally:
        srv.stop()


def test_exposed_server_needs_a_token(bundle, env):
    # 192.0.2.1 (TEST-NET-1) is never this machine's address: nothing can be exposed here.
    proc = edgeq_cli("serve", "--host", "192.0.2.1", "--port", "0", "--runtime", str(bundle), env=env, timeout=30)
    _assert_clean_failure(proc, "refusing to listen on 192.0.2.1", "--token")
    proc = edgeq_cli("serve", "--host", "192.0.2.1", "--port", "0", "--runtime", str(bundle), "--token", "t",
                     env=env, timeout=30)
    _assert_clean_failure(proc, "WARNING", "can run code", "not encrypted", "cannot listen on 192.0.2.1")


def test_server_killed_mid_run(bundle, env, server, tmp_path):
    log = tmp_path / "client.log"
    client = subprocess.Popen([sys.executable, "-m", "edgeq.cli", "remote-test", str(bundle), "--remote",
                               server.address, "--repeat", "100000"], stdout=open(log, "w"),
                              stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + BOUND
        while "session from" not in server.text():
            assert time.monotonic() < deadline and client.poll() is None, log.read_text()
            time.sleep(0.1)
        time.sleep(2)  # uploading / running
        server.stop()
        client.wait(timeout=BOUND)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    output = log.read_text()
    assert client.returncode == 1, output
    assert "Traceback" not in output and "error:" in output
    assert "lost the connection" in output, output


def test_hung_device_times_out(bundle, env, server):
    os.kill(server.proc.pid, signal.SIGSTOP)  # the server accepts in the kernel but never answers
    try:
        started = time.monotonic()
        proc = edgeq_cli("remote-test", str(bundle), "--remote", server.address, "--timeout", "4", env=env)
        _assert_clean_failure(proc, "no answer within 4 s")
        assert time.monotonic() - started < 40
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


def test_wrong_architecture_is_refused_before_upload(bundle, env, server, tmp_path):
    other = tmp_path / "aarch64.edgeq"
    with zipfile.ZipFile(bundle) as src, zipfile.ZipFile(other, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "manifest.json":
                manifest = json.loads(data)
                manifest["target"].update(arch="aarch64", device="rpi4")
                data = json.dumps(manifest).encode()
            dst.writestr(item, data)
    shutil.copy(bundle.parent / MODEL, tmp_path / MODEL)
    proc = edgeq_cli("remote-test", str(other), "--remote", server.address, env=env)
    _assert_clean_failure(proc, "compiled for aarch64", "is x86_64")


def test_api_errors_are_remote_errors(bundle):
    from edgeq.remote import RemoteSession, remote_test

    with pytest.raises(RemoteError, match="cannot connect"):
        RemoteSession(f"127.0.0.1:{free_port()}", timeout=5).connect()
    with pytest.raises(RemoteError, match="either"):
        remote_test(bundle)
    with pytest.raises(RemoteError, match="source model"):
        remote_test(bundle, remote="127.0.0.1:1", model=bundle.parent / "missing.tflite")


# -- an emulated Raspberry Pi (arm64 python under qemu) as the device ------------------------
@pytest.mark.network  # the emulated root and the aarch64 runtime are fetched once, then cached
def test_emulated_aarch64_device(bundle, env, tmp_path):
    from emulator import aarch64_python, ensure_aarch64_root

    from edgeq.runtime_libs import runtime_libraries

    root = ensure_aarch64_root()
    runtime = tmp_path / "runtime-aarch64"
    runtime.mkdir()
    for name, path in runtime_libraries("aarch64").files.items():
        shutil.copy(path, runtime / name)
    # The device sees edgeq as its installed layout: edgeq/, edgeq/runtime, edgeq/deploy_targets.
    site = tmp_path / "site"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO_ROOT / "edgeq", site / "edgeq", ignore=ignore)
    shutil.copytree(REPO_ROOT / "runtime", site / "edgeq" / "runtime", ignore=ignore)
    shutil.copytree(REPO_ROOT / "deploy_targets", site / "edgeq" / "deploy_targets", ignore=ignore)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from edgeq.cli import main; "
            "sys.exit(main(['serve', '--port', '0', '--runtime', sys.argv[2]]))")
    device = Process([*aarch64_python(root), "-c", code, str(site), str(runtime)], env,
                     tmp_path / "device.log", "listening on", timeout=120)
    try:
        address = next(l for l in device.text().splitlines() if "listening on" in l).split("listening on ")[1].split()[0]
        from edgeq.remote import RemoteSession

        with RemoteSession(address, timeout=120) as session:
            assert session.info.arch == "aarch64"
            with pytest.raises(RemoteError, match="compiled for x86_64"):
                session.upload(bundle)
        proc = edgeq_cli("remote-test", str(bundle), "--remote", address, env=env, timeout=180)
        _assert_clean_failure(proc, "compiled for x86_64", "is aarch64")

        # An rpi4 bundle of the same model runs there and agrees with the host reference.
        arm_bundle = bundle.parent / "cifar-rpi4.edgeq"
        edgeq.package(bundle.parent / MODEL, arm_bundle, edgeq.PackageOptions(device="rpi4"))
        images = tmp_path / "images"
        images.mkdir()
        for picture in sorted(shared_path(*PICTURES).iterdir())[:4]:
            shutil.copy(picture, images / picture.name)
        proc = edgeq_cli("remote-test", str(arm_bundle), "--remote", address, "--images", str(images),
                         "--repeat", "3", env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        row = next(line for line in proc.stdout.splitlines() if line.startswith(address))
        assert "aarch64" in row and row.rstrip().endswith("PASS"), row
    finally:
        device.stop()
