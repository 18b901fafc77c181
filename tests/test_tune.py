"""`edgeq tune`: MetaSchedule with a tiny budget, locally and through `edgeq serve` on loopback; the
database resumes, and `apply_tuning_database` swaps in tuned kernels that stay bit-exact."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, cpu_has, shared_path
from processes import Process
from edgeq.devices import host_arch
from edgeq.errors import EdgeqError, RemoteError, UnknownDeviceError

MODEL = "mltk_rps96_int8.tflite"
DEVICE = "x86_64-avx2"
TASK = "dot_conv2d1"  # the smallest int8 convolution (packed for the dot product): one task keeps the budget tiny
BOUND = 120  # seconds a CLI run may take before it counts as a hang

tune_mod = pytest.importorskip("edgeq.tune")
pytest.importorskip("cloudpickle", reason="MetaSchedule's workers need cloudpickle (edgeq[host])")


def model_path() -> Path:
    return shared_path("models", "tflite", MODEL)


def options(db: Path, **changes) -> "tune_mod.TuneOptions":
    values = dict(device=DEVICE, trials=2, database=db, task_filter=(TASK,), timeout=120.0)
    values.update(changes)
    return tune_mod.TuneOptions(**values)


def record_count(db: Path) -> int:
    return len((db / "database_tuning_record.json").read_text().splitlines())


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One local tuning run (2 trials on one task) and what it reported."""
    db = tmp_path_factory.mktemp("tuning") / "db"
    lines: list[str] = []
    result = tune_mod.tune(model_path(), options(db), progress=lines.append)
    return db, result, lines


def test_local_tuning_writes_a_database(tuned):
    db, result, lines = tuned
    assert (db / "database_workload.json").is_file() and record_count(db) == 2
    assert result.measured_on == "this machine" and result.tasks_in_model > 1
    (task,) = result.tasks
    assert TASK in task.name and task.budget == 2
    assert task.trials_now == 2 and task.trials_total == 2 and result.trials_now == 2
    assert task.default_ms is not None and task.default_ms > 0  # edgeq's own schedule, measured alike
    assert task.best_ms is not None and task.best_ms > 0
    assert task.edgeq_ms == (task.knob_ms if task.knobs_applied else task.default_ms)
    assert task.applied == (task.best_ms < task.edgeq_ms)  # MetaSchedule's against edgeq's best own
    assert result.estimated_ms == pytest.approx(min(task.best_ms, task.edgeq_ms))
    assert any("task 1/1" in line and "2/2 trials" in line and "best" in line for line in lines), lines
    defaults = json.loads((db / tune_mod.DEFAULTS_FILE).read_text())["targets"]
    assert len(defaults) == 1 and len(next(iter(defaults.values()))) == 1
    # edgeq's other tile choices were measured too (24 output channels: 3 vectors by default, 1 as well)
    (entry,) = next(iter(defaults.values())).values()
    from edgeq.schedules.rules import DEFAULT_KNOBS

    assert entry["knob_seconds"] > 0 and entry["knobs"] != DEFAULT_KNOBS.to_dict()
    assert task.knob_ms == pytest.approx(entry["knob_seconds"] * 1e3)
    assert any("other tile choices" in line for line in lines), lines


def test_a_database_whose_traces_use_tvm_intrinsics_is_read(tuned, tmp_path, monkeypatch):
    """Records MetaSchedule wrote while trying TVM's own tensor intrinsics (dot_16x4_vnni on a VNNI
    CPU) only read back once those are registered: edgeq registers them and reads again."""
    import tvm
    import tvm.s_tir.meta_schedule as ms

    from edgeq.compiler import tvm_target
    from edgeq.devices import get_device

    db = tmp_path / "db"
    shutil.copytree(tuned[0], db)
    real = ms.database.JSONDatabase
    calls = []

    def unregistered_first(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise tvm.error.InternalError("parallel_for_dynamic error with TensorIntrin 'dot_16x4_vnni' is not registered")
        return real(*args, **kwargs)

    monkeypatch.setattr(ms.database, "JSONDatabase", unregistered_first)
    tune_mod.best_records(db, tvm_target(get_device(DEVICE)))
    assert len(calls) == 2
    assert tvm.s_tir.TensorIntrin.get("dot_16x4_vnni") is not None


def test_rerun_resumes_without_repeating_trials(tuned, tmp_path):
    db = tmp_path / "db"
    shutil.copytree(tuned[0], db)
    lines: list[str] = []
    again = tune_mod.tune(model_path(), options(db), progress=lines.append)
    assert again.trials_now == 0 and again.trials_total == 2 and record_count(db) == 2
    assert any("already in the database" in line for line in lines), lines
    assert again.tasks[0].default_ms == tuned[1].tasks[0].default_ms  # not measured again

    more = tune_mod.tune(model_path(), options(db, trials=3), progress=lines.append)
    assert more.trials_now == 1 and more.trials_total == 3 and record_count(db) == 3


def _build(mod, target, tuning_db=None):
    """The module as edgeq's CPU pipeline schedules it, and the executable that pipeline builds."""
    import tvm

    from edgeq.schedules import ScheduleCPU, build_cpu, kernel_passes

    tuned = [tune_mod.apply_tuning_database(tuning_db, target)] if tuning_db else []
    with target:
        scheduled = tvm.transform.Sequential(kernel_passes(target) + tuned + [ScheduleCPU(target)])(mod)
    return scheduled, build_cpu(mod, target, tuning_db=tuning_db)


def _prim_funcs(mod):
    import tvm

    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def _run(executable, data):
    import tvm

    vm = tvm.runtime.vm.VirtualMachine(executable, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(data))
    return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]


def test_applied_database_swaps_the_tuned_kernel_and_stays_bit_exact(tuned, tmp_path):
    import tvm
    import tvm_ffi

    from edgeq.compiler import CompileOptions, import_model, tvm_target
    from edgeq.devices import get_device
    from edgeq.tflite_model import read_tflite

    db = tmp_path / "db"
    shutil.copytree(tuned[0], db)
    defaults_file = db / tune_mod.DEFAULTS_FILE
    defaults = json.loads(defaults_file.read_text())
    (key,) = defaults["targets"]
    (digest,) = defaults["targets"][key]
    target = tvm_target(get_device(DEVICE))
    model = read_tflite(model_path())
    mod, _ = import_model(model, CompileOptions())

    defaults["targets"][key][digest]["knobs"] = None  # MetaSchedule's record against edgeq's default only
    # edgeq's default beat every record: nothing is applied.
    defaults["targets"][key][digest]["seconds"] = 0.0
    defaults_file.write_text(json.dumps(defaults))
    assert tune_mod.best_records(db, target)[1] == []
    # The tuned record beats it: the pass swaps that one kernel in and marks it scheduled.
    defaults["targets"][key][digest]["seconds"] = 1.0
    defaults_file.write_text(json.dumps(defaults))
    chosen = tune_mod.best_records(db, target)
    assert len(chosen.names) == 1 and TASK in chosen.names[0] and not chosen.knobs
    assert tune_mod.best_records(db, target) is chosen  # packaging's second ask reads nothing again

    default_mod, default_exe = _build(mod, target)
    tuned_mod, tuned_exe = _build(mod, target, tuning_db=db)
    tuned_funcs, default_funcs = _prim_funcs(tuned_mod), _prim_funcs(default_mod)
    assert tuned_funcs.keys() == default_funcs.keys()
    (name,) = [n for n in tuned_funcs if TASK in n]
    assert bool(tuned_funcs[name].attrs["tirx.is_scheduled"])
    assert not tvm_ffi.structural_equal(tuned_funcs[name], default_funcs[name])  # MetaSchedule's loops
    others = [n for n in tuned_funcs if n != name]
    assert others and all(tvm_ffi.structural_equal(tuned_funcs[n], default_funcs[n]) for n in others)

    rng = np.random.default_rng(7)
    spec = model.inputs[0]
    for _ in range(3):
        data = rng.integers(-128, 128, size=spec.shape, dtype=np.int64).astype(spec.dtype)
        for want, got in zip(_run(default_exe, data), _run(tuned_exe, data)):
            np.testing.assert_array_equal(got, want)  # integer outputs exact whatever the schedule

    # Records are per target: another CPU (no mcpu) gets none of them.
    assert tune_mod.best_records(db, tvm_target(get_device("x86_64")))[1] == []

    # `edgeq package --tuning-db`: the bundle names the tuned kernel and computes the same outputs.
    import edgeq

    bundles = {}
    for tag, database in (("default", None), ("tuned", db)):
        options = edgeq.PackageOptions(device=DEVICE, compile=edgeq.CompileOptions(tuning_db=database))
        bundles[tag] = edgeq.package(model_path(), tmp_path / f"{tag}.edgeq", options)
    assert [TASK in n for n in bundles["tuned"].manifest.compile_report["tuned_kernels"]] == [True]
    assert "tuned_kernels" not in bundles["default"].manifest.compile_report
    if cpu_has("avx2"):
        predictors = {tag: edgeq.load(b.path) for tag, b in bundles.items()}
        data = rng.integers(-128, 128, size=spec.shape, dtype=np.int64).astype(spec.dtype)
        np.testing.assert_array_equal(predictors["tuned"].run(data)[0], predictors["default"].run(data)[0])


def test_a_faster_tile_choice_is_applied_and_stays_bit_exact(tuned, tmp_path):
    """Where edgeq's other tile choice beat its default (and MetaSchedule's records), packaging
    schedules that kernel with it; the others keep the default; outputs stay identical."""
    import tvm_ffi

    from edgeq.compiler import CompileOptions, import_model, tvm_target
    from edgeq.devices import get_device
    from edgeq.schedules import cpu_info
    from edgeq.schedules.rules import ScheduleKnobs, schedule_func
    from edgeq.tflite_model import read_tflite

    db = tmp_path / "db"
    shutil.copytree(tuned[0], db)
    defaults_file = db / tune_mod.DEFAULTS_FILE
    defaults = json.loads(defaults_file.read_text())
    (key,) = defaults["targets"]
    (entry,) = defaults["targets"][key].values()
    knobs = ScheduleKnobs(dot_vec_choices=(1,))
    target = tvm_target(get_device(DEVICE))

    # Within the margin of the default: not worth a different schedule.
    entry.update(seconds=1.0, knob_seconds=1.0 - tune_mod.KNOB_MARGIN / 2, knobs=knobs.to_dict())
    defaults_file.write_text(json.dumps(defaults))
    assert tune_mod.best_records(db, target).knobs == {}
    # Clearly faster than the default and than every MetaSchedule record (seconds in the record file).
    entry.update(knob_seconds=0.0)
    defaults_file.write_text(json.dumps(defaults))
    chosen = tune_mod.best_records(db, target)
    assert list(chosen.knobs.values()) == [knobs] and len(chosen.database) == 0
    assert len(chosen.names) == 1 and TASK in chosen.names[0] and "edgeq tiles" in chosen.names[0]

    model = read_tflite(model_path())
    mod, _ = import_model(model, CompileOptions())
    default_mod, default_exe = _build(mod, target)
    tuned_mod, tuned_exe = _build(mod, target, tuning_db=db)
    tuned_funcs, default_funcs = _prim_funcs(tuned_mod), _prim_funcs(default_mod)
    (name,) = [n for n in tuned_funcs if TASK in n]
    assert not tvm_ffi.structural_equal(tuned_funcs[name], default_funcs[name])
    others = [n for n in tuned_funcs if n != name]
    assert others and all(tvm_ffi.structural_equal(tuned_funcs[n], default_funcs[n]) for n in others)
    # It is exactly edgeq's schedule with those knobs, of the same kernel.
    from edgeq.schedules import kernel_passes
    import tvm

    with target:
        unscheduled = _prim_funcs(tvm.transform.Sequential(kernel_passes(target))(mod))[name]
    expected = schedule_func(unscheduled, cpu_info(target), knobs)
    assert tvm_ffi.structural_equal(tuned_funcs[name].without_attr("tirx.is_scheduled"),
                                    expected.without_attr("tirx.is_scheduled"))

    rng = np.random.default_rng(11)
    spec = model.inputs[0]
    for _ in range(3):
        data = rng.integers(-128, 128, size=spec.shape, dtype=np.int64).astype(spec.dtype)
        for want, got in zip(_run(default_exe, data), _run(tuned_exe, data)):
            np.testing.assert_array_equal(got, want)


def test_a_tile_choice_that_wins_once_is_timed_again(monkeypatch):
    """One fast timing of another tile (or one slow timing of the default) is not enough: both are
    timed again and each keeps its faster time; without a win nothing more is timed."""
    import tvm

    from edgeq.devices import get_device

    device = get_device(DEVICE)
    mod = tune_mod.tuning_module(model_path(), device)
    (func,) = [f for gv, f in mod.functions_items() if TASK in gv.name_hint]
    task = tune_mod._Task(TASK, tvm.IRModule({"main": func}), calls=1, flops=0.0)
    timings: list[float] = []
    calls = []

    def fake_measure(scheduled, original, target, measurer):
        calls.append(scheduled)
        return timings.pop(0) if timings else 0.9

    monkeypatch.setattr(tune_mod, "_measure", fake_measure)
    timings[:] = [0.5]  # the first other tile: 0.5 s against the default's 1.0 s; then both again
    knobs, seconds, default, count = tune_mod._search_knobs(task, device, None, None, 1.0)
    assert count >= 1 and len(calls) == count + 2 and knobs is not None
    assert seconds == 0.5 and default == 0.9  # each keeps its faster timing
    calls.clear()
    knobs, seconds, default, count = tune_mod._search_knobs(task, device, None, None, 0.5)
    assert len(calls) == count and default == 0.5 and seconds == 0.9  # no win: no second timing


def test_schedule_knobs_round_trip_and_refuse_unknown_names():
    from edgeq.schedules.rules import DEFAULT_KNOBS, KNOB_CANDIDATES, ScheduleKnobs

    for knobs in (DEFAULT_KNOBS, *KNOB_CANDIDATES):
        assert ScheduleKnobs.from_dict(json.loads(json.dumps(knobs.to_dict()))) == knobs
    assert len(set(KNOB_CANDIDATES)) == len(KNOB_CANDIDATES) and DEFAULT_KNOBS not in KNOB_CANDIDATES
    with pytest.raises(ValueError, match="unknown schedule knobs warp_size"):
        ScheduleKnobs.from_dict({"warp_size": 32})


# -- through `edgeq serve` on loopback ----------------------------------------------------------
def start_server(tmp_path: Path, *extra: str) -> Process:
    """`edgeq serve` on 127.0.0.1 with a token, serving the host's own TVM runtime libraries."""
    import tvm
    import tvm_ffi

    runtime = tmp_path / "runtime"
    runtime.mkdir(exist_ok=True)
    shutil.copy(Path(tvm.__file__).parent / "lib" / "libtvm_runtime.so", runtime)
    shutil.copy(Path(tvm_ffi.__file__).parent / "lib" / "libtvm_ffi.so", runtime)
    env = dict(os.environ, EDGEQ_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("EDGEQ_RPC_TOKEN", None)
    return Process([sys.executable, "-m", "edgeq.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                    "--runtime", str(runtime), "--token", "s3cret", *extra],
                   env, tmp_path / "server.log", "listening on")


@pytest.fixture
def server(tmp_path):
    srv = start_server(tmp_path)
    yield srv.text().split("listening on ")[1].split()[0], srv.log
    srv.stop()


def test_tuning_measures_on_an_rpc_device(server, tmp_path):
    address, log = server
    lines: list[str] = []
    result = tune_mod.tune(model_path(), options(tmp_path / "db", trials=1, remote=address, token="s3cret"),
                           progress=lines.append)
    (task,) = result.tasks
    assert result.measured_on == address and task.trials_now == 1 and task.default_ms is not None
    assert task.best_ms is not None, lines  # the candidate ran on the device
    assert record_count(tmp_path / "db") == 1
    assert log.read_text().count("session from 127.0.0.1 (pid") >= 3  # probe, default, candidate

    with pytest.raises(RemoteError, match="wrong device key or token"):
        tune_mod.tune(model_path(), options(tmp_path / "db", remote=address, token="wrong"))


def test_tuning_measures_on_a_device_from_a_tracker(tmp_path):
    pytest.importorskip("tornado", reason="TVM's tracker needs tornado")
    code = ("from tvm.rpc.tracker import PopenTrackerServerState as S\n"
            "s = S('127.0.0.1', 9190, 9390, silent=True)\n"
            "print('tracker port', s.port, flush=True)\n"
            "s.thread.join()\n")
    tracker = Process([sys.executable, "-c", code], dict(os.environ), tmp_path / "tracker.log", "tracker port")
    srv = None
    try:
        address = f"127.0.0.1:{tracker.text().split('tracker port')[1].split()[0]}"
        srv = start_server(tmp_path, "--tracker", address, "--key", "tunepi")
        deadline = time.monotonic() + 20
        while "registered with tracker" not in srv.text():
            assert time.monotonic() < deadline, srv.text()
            time.sleep(0.1)
        result = tune_mod.tune(model_path(), options(tmp_path / "db", trials=1, tracker=address, key="tunepi",
                                                     token="s3cret"))
        assert result.measured_on == f"tracker {address} key 'tunepi'"
        assert result.trials_now == 1 and result.tasks[0].best_ms is not None
    finally:
        if srv is not None:
            srv.stop()
        tracker.stop()


# -- errors and the CLI -------------------------------------------------------------------------
def test_clear_errors(tmp_path):
    with pytest.raises(UnknownDeviceError, match="unknown device 'nope'"):
        tune_mod.tune(model_path(), options(tmp_path / "db", device="nope"))
    with pytest.raises(RemoteError, match="cannot connect to 127.0.0.1:9"):
        tune_mod.tune(model_path(), options(tmp_path / "db", remote="127.0.0.1:9"))
    with pytest.raises(EdgeqError, match="no tunable tasks matching nosuchop"):
        tune_mod.tune(model_path(), options(tmp_path / "db", task_filter=("nosuchop",)))
    with pytest.raises(EdgeqError, match="--tracker needs --key"):
        options(tmp_path / "db", tracker="127.0.0.1:9")
    if host_arch() != "aarch64":
        with pytest.raises(EdgeqError, match="is aarch64 and this machine is not"):
            tune_mod.tune(model_path(), options(tmp_path / "db", device="rpi4"))
    with pytest.raises(EdgeqError, match="holds no tuning database"):
        tune_mod.apply_tuning_database(tmp_path / "empty", None)


def edgeq_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "edgeq.cli", *args], capture_output=True, text=True,
                          timeout=BOUND, env=env)


def test_cli(tuned, tmp_path):
    listed = edgeq_cli("tune", str(model_path()), "--device", DEVICE, "--list-tasks")
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    assert len(names) == tuned[1].tasks_in_model and "conv2d" in names[0]  # heaviest first

    db = tmp_path / "db"
    shutil.copytree(tuned[0], db)
    proc = edgeq_cli("tune", str(model_path()), "--device", DEVICE, "--db", str(db), "--task", TASK,
                     "--trials", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["trials_now"] == 0 and report["trials_total"] == 2 and report["database"] == str(db)
    assert "already in the database" in proc.stderr

    text = edgeq_cli("tune", str(model_path()), "--device", DEVICE, "--db", str(db), "--task", TASK, "--trials", "2")
    assert text.returncode == 0 and "--tuning-db" in text.stdout and "packaging uses" in text.stdout

    bad = edgeq_cli("tune", str(model_path()), "--device", DEVICE, "--db", str(db), "--remote", "127.0.0.1:9")
    assert bad.returncode == 1 and "edgeq: error: cannot connect to 127.0.0.1:9" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_tiny_kernels_are_not_tasks():
    """Kernels of a few elements (rps96's softmax over 3 classes, its dequantize) are left out:
    edgeq does not schedule them either, and MetaSchedule spent minutes on the softmax alone."""
    names = [name for name, _calls, _flops in tune_mod.list_tasks(model_path(), DEVICE)]
    assert names and not [n for n in names if "softmax" in n or n.endswith("take")], names
    assert any("window_sum1" in n for n in names)  # a 4 x 4 x 24 pool is large enough to stay


def test_a_kernel_metaschedule_cannot_tune_keeps_the_default(tmp_path, monkeypatch):
    """A TVM error inside one task's search is reported on its line and the run goes on."""
    ms = tune_mod._meta_schedule()

    def fail(**_kwargs):
        raise RuntimeError("Traceback ...\nInternalError: Do not have a default for prim.Let")

    monkeypatch.setattr(ms, "tune_tasks", fail)
    lines: list[str] = []
    result = tune_mod.tune(model_path(), options(tmp_path / "db", trials=1), progress=lines.append)
    assert any("MetaSchedule cannot tune it (InternalError: Do not have a default for prim.Let)" in line
               for line in lines), lines
    assert len(result.tasks) == 1 and not result.tasks[0].applied and result.tasks[0].trials_now == 0
