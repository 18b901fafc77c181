"""``edgeq tune``: MetaSchedule tuning of a model's kernels, measured locally or on a device over RPC.

The tasks are the PrimFuncs edgeq's CPU pipeline builds (the model after
:func:`edgeq.schedules.kernel_passes`: library dispatch, dot-product weight packing, legalize and
fuse), so the database applies to exactly what ``edgeq package`` compiles. For every task edgeq's
own default schedule is measured once, the same way, and so are its other register-tile choices
(:data:`edgeq.schedules.rules.KNOB_CANDIDATES`: which tile suits a kernel depends on its epilogue
and its shapes in ways a cost formula does not capture); both are kept beside MetaSchedule's records.
:func:`apply_tuning_database` uses, per kernel, the fastest of the three: edgeq's default, its best
other tile choice (when at least :data:`KNOB_MARGIN` faster) or MetaSchedule's best record.
Kernels timed alone do not always predict the whole model (caches, threads): check a tuned bundle
with ``edgeq bench``.

Layout of a database folder (one folder can hold several models and devices):

- ``database_workload.json`` / ``database_tuning_record.json``: MetaSchedule's JSONDatabase.
  Workloads are compared structurally, so models that share a kernel share its records.
- ``edgeq_defaults.json``: per target and workload, edgeq's default schedule's latency and its
  best other tile choice (``knobs``, ``knob_seconds``; ``knobs`` null: none was faster).

Resuming: every trial lands in the database as it finishes (failed ones too). A run counts the
trials already recorded for each task on this target and only runs the rest of its budget;
MetaSchedule's evolutionary search starts from the best recorded schedules (warm start).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from .devices import Device, get_device
from .errors import EdgeqError, MissingDependencyError, RemoteError, UnsupportedModelError

Progress = Callable[[str], None]
COST_MODELS = ("auto", "xgb", "random")
DEFAULTS_FILE = "edgeq_defaults.json"
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
FAILED_SECONDS = 1e9  # MetaSchedule records failed trials with a run time of 1e10 s
MAX_BATCH = 32  # trials measured per search round
KNOB_MARGIN = 0.02  # another tile choice replaces edgeq's default only when this much faster


@dataclass(frozen=True)
class TuneOptions:
    """What to tune, where to measure it and how long to search."""

    device: str = "x86_64"  # deploy target (see `edgeq devices`)
    trials: int = 64  # measured trials for the model, split over its tasks (heaviest first)
    database: Path = Path("edgeq-tuning")  # tuning database folder; created, reused, resumed
    remote: str | None = None  # HOST:PORT of an `edgeq serve` device to measure on
    tracker: str | None = None  # HOST:PORT of a TVM tracker ...
    key: str = ""  # ... and the device key to ask it for
    token: str | None = None  # the server's shared secret (default $EDGEQ_RPC_TOKEN)
    timeout: float = 60.0  # seconds allowed per build and per measurement
    seed: int = 0
    cost_model: str = "auto"  # "xgb" (needs xgboost), "random", or "auto": xgb when installed
    task_filter: tuple[str, ...] = ()  # only tasks whose name contains one of these
    max_tasks: int | None = None  # only the N heaviest tasks (estimated FLOPs x call count)
    population: int | None = None  # evolutionary search population (default: scales with budget)
    verbose: bool = False  # let MetaSchedule's own log through

    def __post_init__(self) -> None:
        if self.trials < 0:
            raise EdgeqError(f"--trials must be 0 or more, not {self.trials}")
        if self.cost_model not in COST_MODELS:
            raise EdgeqError(f"unknown cost model {self.cost_model!r}; choose one of {', '.join(COST_MODELS)}")
        if self.remote and self.tracker:
            raise EdgeqError("measure on one --remote device or through a --tracker, not both")
        if self.tracker and not self.key:
            raise EdgeqError("--tracker needs --key (the device key the servers registered under, e.g. rpi4)")
        if self.max_tasks is not None and self.max_tasks < 1:
            raise EdgeqError(f"--max-tasks must be 1 or more, not {self.max_tasks}")
        if self.timeout <= 0:
            raise EdgeqError(f"--timeout must be positive, not {self.timeout}")


@dataclass(frozen=True)
class TaskResult:
    """One tuning task (a fused kernel) and what is known about it on this target."""

    name: str
    calls: int  # how often the model calls it
    flops: float
    budget: int  # trials this run's --trials gives it
    trials_total: int  # trials recorded for it on this target, this run's included
    trials_now: int
    best_ms: float | None  # fastest tuned schedule (None: no trial succeeded)
    default_ms: float | None  # edgeq's default schedule, measured the same way
    knob_ms: float | None = None  # edgeq's best other tile choice (None: none measured)
    knobs: dict[str, Any] | None = None  # that choice (ScheduleKnobs.to_dict())

    @property
    def knobs_applied(self) -> bool:
        """True when edgeq's other tile choice beat its default by :data:`KNOB_MARGIN`."""
        return _knobs_win(self.knob_ms, self.default_ms)

    @property
    def edgeq_ms(self) -> float | None:
        """edgeq's own schedule packaging would use: the better tile choice, else the default."""
        return self.knob_ms if self.knobs_applied else self.default_ms

    @property
    def applied(self) -> bool:
        """True when packaging will use the tuned schedule (it beat edgeq's own)."""
        return self.best_ms is not None and (self.edgeq_ms is None or self.best_ms < self.edgeq_ms)

    @property
    def chosen_ms(self) -> float | None:
        """The latency packaging gets: the tuned one where it won, else edgeq's own."""
        return self.best_ms if self.applied else self.edgeq_ms

    @property
    def uses(self) -> str:
        """What packaging uses for this kernel, in words."""
        if self.applied:
            return "tuned"
        if self.knobs_applied:
            from .schedules.rules import DEFAULT_KNOBS

            default = DEFAULT_KNOBS.to_dict()
            changed = {k: v for k, v in (self.knobs or {}).items() if default.get(k) != v}
            return "edgeq tiles " + ", ".join(f"{k}={v}" for k, v in changed.items())
        return "edgeq default"


def _knobs_win(knob: float | None, default: float | None) -> bool:
    return knob is not None and default is not None and knob < default * (1.0 - KNOB_MARGIN)


@dataclass(frozen=True)
class TuneResult:
    """What ``tune`` did: its tasks, trials and the database it wrote."""

    model: str
    device: str
    target: dict[str, Any]
    measured_on: str  # "this machine" or the remote/tracker address
    database: Path
    tasks: tuple[TaskResult, ...]
    tasks_in_model: int
    cost_model: str
    seconds: float

    @property
    def trials_now(self) -> int:
        return sum(t.trials_now for t in self.tasks)

    @property
    def trials_total(self) -> int:
        return sum(t.trials_total for t in self.tasks)

    @property
    def estimated_ms(self) -> float | None:
        """Kernel time of the tuned tasks, each at the schedule packaging will choose, x calls."""
        return _weighted(self.tasks, lambda t: t.chosen_ms)

    @property
    def default_ms(self) -> float | None:
        """The same tasks' kernel time with edgeq's default schedules."""
        return _weighted(self.tasks, lambda t: t.default_ms)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "device": self.device, "target": self.target, "measured_on": self.measured_on,
            "database": str(self.database), "cost_model": self.cost_model, "seconds": round(self.seconds, 1),
            "tasks_in_model": self.tasks_in_model, "trials_now": self.trials_now,
            "trials_total": self.trials_total, "estimated_ms": self.estimated_ms, "default_ms": self.default_ms,
            "tasks": [{**t.__dict__, "applied": t.applied, "uses": t.uses} for t in self.tasks],
        }


def _weighted(tasks: Sequence[TaskResult], latency: Callable[[TaskResult], float | None]) -> float | None:
    values = [(latency(t), t.calls) for t in tasks]
    if not values or any(v is None for v, _ in values):
        return None
    return sum(v * calls for v, calls in values)  # type: ignore[operator]


# -- TVM pieces --------------------------------------------------------------------------------
def _meta_schedule() -> Any:
    try:
        import cloudpickle  # noqa: F401  - MetaSchedule's build and measure workers need it
        from tvm.s_tir import meta_schedule
    except ImportError as error:
        raise MissingDependencyError(
            f"tuning needs the host extras ({error.name} is missing): pip install 'edgeq[host]'"
        ) from None
    return meta_schedule


def target_key(target: Any) -> str:
    """What identifies a target's records: kind, triple, CPU and features (not its core count)."""
    exported = dict(target.export())
    for volatile in ("num-cores", "tag", "keys", "host"):
        exported.pop(volatile, None)
    return json.dumps({k: list(v) if isinstance(v, (list, tuple)) else v for k, v in exported.items()},
                      sort_keys=True, default=str)


def workload_key(mod: Any) -> str:
    """Structural hash of a workload module, as MetaSchedule's JSON database keys it."""
    import tvm_ffi

    return str(tvm_ffi.structural_hash(mod))


def tuning_module(model_path: str | os.PathLike[str], device: Device) -> Any:
    """The model as edgeq's CPU pipeline hands it to its schedules: imported, legalized and fused."""
    import tvm

    from .compiler import CompileOptions, import_model, tvm_target
    from .schedules import kernel_passes

    path = Path(model_path)
    if not path.is_file():
        raise EdgeqError(f"{path} does not exist")
    if path.suffix.lower() == ".onnx":
        from .onnx_model import read_onnx

        model: Any = read_onnx(path)
    else:
        from .tflite_model import read_tflite

        model = read_tflite(path)
    mod, _report = import_model(model, CompileOptions())
    target = tvm_target(device)
    with target:
        return tvm.transform.Sequential(kernel_passes(target))(mod)


@dataclass
class _Task:
    name: str
    mod: Any  # IRModule with one PrimFunc "main"
    calls: int
    flops: float
    budget: int = 0


def _extract_tasks(mod: Any, target: Any, options: TuneOptions) -> tuple[list[_Task], int]:
    """Tuning tasks, heaviest first, after --task and --max-tasks; and how many the model has."""
    from tvm.s_tir.analysis import estimate_tir_flops

    from .schedules.rules import is_scalar_sized

    ms = _meta_schedule()
    extracted = ms.relax_integration.extract_tasks(mod, target)
    tasks = []
    for task in extracted:
        if task.mod.attrs and task.mod.attrs.get("tirx.is_scheduled", False):
            continue
        if is_scalar_sized(task.dispatched[0]):
            continue  # a few elements (a softmax over 3 classes): nothing to gain, slow to search
        try:
            flops = float(estimate_tir_flops(task.dispatched[0]))
        except Exception:  # noqa: BLE001 - the estimate is only used for ordering
            flops = 0.0
        tasks.append(_Task(task.task_name, task.dispatched[0], int(task.weight), flops))
    total = len(tasks)
    if options.task_filter:
        tasks = [t for t in tasks if any(part in t.name for part in options.task_filter)]
    tasks.sort(key=lambda t: -t.flops * t.calls)
    if options.max_tasks is not None:
        tasks = tasks[: options.max_tasks]
    return tasks, total


def _split_budget(tasks: list[_Task], trials: int) -> None:
    """Share ``trials`` over the tasks, heaviest first (tasks beyond the budget get none)."""
    if not tasks:
        return
    share, extra = divmod(trials, len(tasks))
    for index, task in enumerate(tasks):
        task.budget = share + (1 if index < extra else 0)


# -- the database ------------------------------------------------------------------------------
def _open_database(folder: Path, create: bool) -> Any:
    ms = _meta_schedule()
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise EdgeqError(f"cannot create the tuning database folder {folder}: {error.strerror}") from None
    elif not (folder / WORKLOAD_FILE).is_file() or not (folder / RECORD_FILE).is_file():
        raise EdgeqError(f"{folder} holds no tuning database ({WORKLOAD_FILE} and {RECORD_FILE}); "
                         "create one with `edgeq tune MODEL --device D --db DIR`")
    try:
        try:
            return ms.database.JSONDatabase(work_dir=str(folder), allow_missing=create)
        except Exception as error:  # noqa: BLE001
            if "TensorIntrin" not in str(error) or "not registered" not in str(error):
                raise
            # A trace tensorizes with one of TVM's intrinsics (MetaSchedule tried dot_16x4_vnni):
            # register them (about 15 s, so only when a database needs them) and read it again.
            import tvm.s_tir.tensor_intrin  # noqa: F401

            return ms.database.JSONDatabase(work_dir=str(folder), allow_missing=create)
    except Exception as error:  # noqa: BLE001 - TVM reports unreadable files as assorted errors
        raise EdgeqError(f"cannot read the tuning database in {folder}: {_last_line(error)}") from None


def _read_defaults(folder: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """{target key: {workload key: {"task": name, "seconds": edgeq's default schedule's time}}}."""
    path = folder / DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        return {k: dict(v) for k, v in json.loads(path.read_text()).get("targets", {}).items()}
    except (ValueError, AttributeError, TypeError) as error:
        raise EdgeqError(f"{path} is not an edgeq tuning file ({error}); delete it to re-measure") from None


def _write_defaults(folder: Path, defaults: dict[str, dict[str, dict[str, Any]]]) -> None:
    path = folder / DEFAULTS_FILE
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps({"version": 1, "targets": defaults}, indent=1, sort_keys=True))
    os.replace(staging, path)


def _seconds(record: Any) -> float | None:
    """Mean run time of a record, or None for failed trials."""
    if record.run_secs is None or len(record.run_secs) == 0:
        return None
    values = [float(s) for s in record.run_secs]
    mean = sum(values) / len(values)
    return None if mean >= FAILED_SECONDS else mean


def _records_by_workload(database: Any, key: str) -> dict[str, list[Any]]:
    """This target's records in the database, grouped by workload hash."""
    groups: dict[str, list[Any]] = {}
    hashes: dict[int, str] = {}
    for record in database.get_all_tuning_records():
        if record.target is None or target_key(record.target) != key:
            continue
        workload = record.workload
        digest = hashes.setdefault(id(workload), workload_key(workload.mod))
        groups.setdefault(digest, []).append(record)
    return groups


class TunedKernels(NamedTuple):
    """What a tuning database gives one target's build."""

    database: Any  # MemoryDatabase: per workload, MetaSchedule's fastest record where it won
    names: list[str]  # the task names of every kernel not built with edgeq's default schedule
    knobs: dict[str, Any]  # workload key -> ScheduleKnobs, where edgeq's other tile choice won


_best_records_cache: dict[tuple[Any, ...], TunedKernels] = {}


def best_records(database_dir: str | os.PathLike[str], target: Any) -> TunedKernels:
    """Per workload tuned for ``target``, what beat edgeq's default schedule: MetaSchedule's
    fastest record, or edgeq's best other tile choice (see :class:`TunedKernels`).

    Packaging asks twice (for the report, then for the build): the answer is kept while the
    database's files hold the same bytes."""
    folder = Path(database_dir)
    files = [folder / name for name in (WORKLOAD_FILE, RECORD_FILE, DEFAULTS_FILE)]
    if not all(f.is_file() for f in files[:2]):
        _open_database(folder, create=False)  # says what is missing
    key = target_key(target)
    versions = [hashlib.blake2b(f.read_bytes(), digest_size=16).digest() if f.is_file() else None for f in files]
    stamp = (str(folder.resolve()), key, *versions)
    if stamp not in _best_records_cache:
        _best_records_cache.clear()
        _best_records_cache[stamp] = _read_best_records(folder, key)
    return _best_records_cache[stamp]


def _read_best_records(folder: Path, key: str) -> TunedKernels:
    from .schedules.rules import ScheduleKnobs

    ms = _meta_schedule()
    database = _open_database(folder, create=False)
    defaults = _read_defaults(folder).get(key, {})
    chosen = ms.database.MemoryDatabase()
    names = []
    knobs = {}
    edgeq_seconds = {}  # edgeq's own best per workload: its default, or a better tile choice
    for digest, entry in defaults.items():
        default, knob = entry.get("seconds"), entry.get("knob_seconds")
        edgeq_seconds[digest] = default
        if entry.get("knobs") and _knobs_win(knob, default):
            try:
                knobs[digest] = ScheduleKnobs.from_dict(entry["knobs"])
            except (TypeError, ValueError) as error:
                raise EdgeqError(f"{folder / DEFAULTS_FILE}: {error}; tune again with this edgeq") from None
            edgeq_seconds[digest] = knob
    for digest, records in _records_by_workload(database, key).items():
        timed = [(s, r) for r in records if (s := _seconds(r)) is not None]
        if not timed:
            continue
        seconds, record = min(timed, key=lambda pair: pair[0])
        own = edgeq_seconds.get(digest)
        if own is not None and own <= seconds:
            continue  # edgeq's own schedule is at least as fast
        knobs.pop(digest, None)
        workload = chosen.commit_workload(record.workload.mod)
        chosen.commit_tuning_record(ms.database.TuningRecord(
            record.trace, workload, record.run_secs, record.target, record.args_info))
        names.append(str(defaults.get(digest, {}).get("task", digest)))
    names += [f"{defaults[digest].get('task', digest)} (edgeq tiles)" for digest in knobs]
    return TunedKernels(chosen, names, knobs)


def apply_tuning_database(database_dir: str | os.PathLike[str], target: Any) -> Any:
    """A module pass that swaps in the tuned schedules a database holds for ``target``.

    Insert it into the CPU pipeline after the legalize/fuse passes and before edgeq's
    ``ScheduleCPU``: tuned PrimFuncs (MetaSchedule's, or edgeq's with the tile choice that won)
    come out marked ``tirx.is_scheduled`` (which ScheduleCPU skips), every other PrimFunc keeps
    edgeq's default schedule. Only records for the same target (kind, triple, CPU, features) that
    beat edgeq's default schedule are applied.
    """
    import tvm
    from tvm import relax

    from .schedules.pipeline import schedule_unscheduled

    tuned = best_records(database_dir, target)

    @tvm.transform.module_pass(opt_level=0, name="edgeq.ApplyTuningDatabase")
    def _apply(mod: Any, _ctx: Any) -> Any:
        if len(tuned.database):
            with target, tuned.database:
                mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        if not tuned.knobs:
            return mod
        return schedule_unscheduled(mod, target, lambda func: tuned.knobs.get(workload_key(_normalize(func))))

    return _apply


def _normalize(func: Any) -> Any:
    """A PrimFunc as MetaSchedule's database keys it (a module with ``main``)."""
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    return _normalize_mod(func)


# -- measuring: builder and runners (these functions run in MetaSchedule's worker processes) -----
def build_candidate(mod: Any, target: Any, _params: Any = None) -> Any:
    """MetaSchedule's default build without importing every tensor intrinsic in each worker (that
    import takes tens of seconds; scheduled candidates already carry their tensorized bodies)."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from .schedules.pipeline import tir_pipeline_for

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.compile(mod, target=target, tir_pipeline=tir_pipeline_for(target))


def export_shared_library(rt_mod: Any, cross_compiler: str | None = None) -> str:
    """Export a built candidate as a shared library (``edgeq serve`` loads .so files, not .tar)."""
    folder = tempfile.mkdtemp(prefix="edgeq-tune-")
    path = os.path.join(folder, "candidate.so")
    if cross_compiler:
        from tvm.support import cc

        rt_mod.export_library(path, fcompile=cc.cross_compiler(cross_compiler))
    else:
        rt_mod.export_library(path)
    return path


def _host_arrays(args_info: Sequence[Any], alloc_repeat: int) -> list[list[Any]]:
    import numpy as np

    rng = np.random.default_rng(0)
    repeated = []
    for _ in range(alloc_repeat):
        arrays = []
        for kind, dtype, shape in args_info:
            if kind != "TENSOR":
                raise NotImplementedError(f"argument kind {kind}")
            if str(dtype).startswith(("float", "bfloat")):
                arrays.append(rng.uniform(-1, 1, size=shape).astype(dtype))
            else:  # integer tensors may be indices or divisors: ones are safe for both
                arrays.append(np.ones(shape, dtype=dtype))
        repeated.append(arrays)
    return repeated


def alloc_local_arguments(device: Any, args_info: Sequence[Any], alloc_repeat: int) -> list[list[Any]]:
    """Measurement arguments on this machine, filled from numpy."""
    import tvm

    return [[tvm.runtime.tensor(a, device=device) for a in arrays] for arrays in _host_arrays(args_info, alloc_repeat)]


def alloc_remote_arguments(session: Any, device: Any, args_info: Sequence[Any], alloc_repeat: int) -> list[list[Any]]:
    """Measurement arguments on the device, filled from host numpy (the device's runtime has no
    ``tvm.contrib.random``)."""
    import tvm

    return [[tvm.runtime.tensor(a, device=device) for a in arrays] for arrays in _host_arrays(args_info, alloc_repeat)]


def connect_remote(host: str, port: int, key: str, token: str | None, rpc_config: Any) -> Any:
    """An RPC session with one ``edgeq serve`` device, presenting the token."""
    from tvm import rpc

    handshake = key + (f" -token={token}" if token else "")
    return rpc.connect(host, port, key=handshake, session_timeout=int(rpc_config.session_timeout_sec))


def connect_via_tracker(host: str, port: int, key: str, token: str | None, rpc_config: Any) -> Any:
    """A device under ``key`` from a TVM tracker, connected with the tracker's one-time match key
    and the token (TVM's own tracker request cannot pass a token)."""
    from tvm import rpc

    from .serve import TRACKER_REQUEST, TRACKER_SUCCESS, recv_json, send_json, tracker_connect

    with tracker_connect((host, port), timeout=rpc_config.session_timeout_sec) as sock:
        sock.settimeout(None)
        send_json(sock, [TRACKER_REQUEST, key, "", 1])
        reply = recv_json(sock)
        if reply[0] != TRACKER_SUCCESS:
            raise RuntimeError(f"the tracker refused the request: {reply}")
        device_host, device_port, matchkey = reply[1]
        handshake = matchkey + (f" -token={token}" if token else "")
        return rpc.connect(device_host, int(device_port), key=handshake,
                           session_timeout=int(rpc_config.session_timeout_sec))


def remove_remote_artifact(session: Any, remote_path: str | None) -> None:
    """Remove the uploaded candidate (the session's folder goes when the session ends)."""
    if session is not None and remote_path is not None:
        try:
            session.remove(remote_path)
        except Exception:  # noqa: BLE001 - best effort; the server removes the folder anyway
            pass


@dataclass(frozen=True)
class _Measurer:
    """Where and how candidates are built and timed."""

    builder: Any
    runner: Any
    where: str
    num_cores: int


def _evaluator(ms: Any) -> Any:
    return ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50, enable_cpu_cache_flush=False)


def _measurer(device: Device, options: TuneOptions) -> _Measurer:
    ms = _meta_schedule()
    from .serve import TOKEN_ENV, parse_address

    token = options.token if options.token is not None else os.environ.get(TOKEN_ENV) or None
    cross = device.cross_compiler if device.needs_cross_compiler else None
    if device.needs_cross_compiler and not (options.remote or options.tracker):
        raise EdgeqError(f"device {device.name!r} is {device.arch} and this machine is not: measure on the "
                         "device itself with --remote HOST:PORT (edgeq serve) or --tracker HOST:PORT --key K")
    if cross:
        import shutil

        if shutil.which(cross) is None:
            raise MissingDependencyError(f"tuning for {device.name} builds candidates with the cross compiler "
                                         f"{cross}; install it, e.g. `sudo apt-get install {device.cross_compiler_package}`")
    builder = ms.builder.LocalBuilder(
        f_build=build_candidate, f_export=functools.partial(export_shared_library, cross_compiler=cross),
        timeout_sec=options.timeout, max_workers=1)
    if not options.remote and not options.tracker:
        runner = ms.runner.LocalRunner(timeout_sec=options.timeout, evaluator_config=_evaluator(ms),
                                       f_alloc_argument=alloc_local_arguments)
        return _Measurer(builder, runner, "this machine", device.num_cores or os.cpu_count() or 1)
    if options.remote:
        host, port = parse_address(options.remote)
        num_cores = _probe_remote(options.remote, device, token, options.timeout)
        create = functools.partial(connect_remote, host, port, "", token)
        where = f"{host}:{port}"
    else:
        host, port = parse_address(options.tracker or "")
        _probe_tracker(host, port)
        create = functools.partial(connect_via_tracker, host, port, options.key, token)
        num_cores = device.num_cores or 0
        where = f"tracker {host}:{port} key {options.key!r}"
    # f_create_session connects; RPCConfig only carries the session timeout (its tracker fields are unused)
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=options.key or "edgeq",
                                 session_timeout_sec=int(math.ceil(options.timeout)))
    runner = ms.runner.RPCRunner(
        rpc_config=config, evaluator_config=_evaluator(ms), f_create_session=create,
        f_alloc_argument=alloc_remote_arguments, f_cleanup=remove_remote_artifact, max_workers=1)
    return _Measurer(builder, runner, where, device.num_cores or num_cores or 1)


def _probe_remote(remote: str, device: Device, token: str | None, timeout: float) -> int:
    """Connect once: a clear error for an unreachable server, a wrong token or a wrong board; the
    device's core count."""
    from .remote import RemoteSession

    with RemoteSession(remote, token=token, timeout=max(timeout, 10.0)) as session:
        info = session.info
    assert info is not None
    if info.arch != device.arch:
        raise RemoteError(f"{remote} ({info.hostname}) is {info.arch} but device {device.name!r} is "
                          f"{device.arch}; pass the --device that matches the board")
    missing = [f for f in device.cpu_features if info.cpu_features is not None and f not in info.cpu_features]
    if missing:
        raise RemoteError(f"{remote} ({info.hostname}) lacks CPU features {', '.join(missing)} that device "
                          f"{device.name!r} needs")
    return info.cpu_count


def _probe_tracker(host: str, port: int) -> None:
    from .serve import tracker_connect

    try:
        tracker_connect((host, port), timeout=10.0).close()
    except OSError as error:
        raise RemoteError(f"cannot reach the tracker at {host}:{port} ({error.strerror or error}): is it "
                          "running (python -m tvm.exec.rpc_tracker), and is the port reachable?") from None


# -- tuning ------------------------------------------------------------------------------------
@contextmanager
def _quiet_meta_schedule(verbose: bool) -> Iterator[logging.Logger]:
    """MetaSchedule's loggers at WARNING unless ``verbose``; yields the per-task logger."""
    names = ("tvm.s_tir.meta_schedule", "tvm.support.popen_pool")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    task_logger = logging.getLogger("edgeq.tune.search")
    if not verbose:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        task_logger.setLevel(logging.WARNING)
    else:
        task_logger.setLevel(logging.INFO)
    try:
        yield task_logger
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _cost_model_kind(requested: str) -> str:
    """``xgb`` or ``random``: "auto" picks xgb when xgboost is installed."""
    try:
        import xgboost  # noqa: F401

        installed = True
    except ImportError:
        installed = False
    if requested == "xgb" and not installed:
        raise MissingDependencyError("the xgb cost model needs xgboost: pip install xgboost-cpu "
                                     "(or use --cost-model random)")
    if requested == "auto":
        return "xgb" if installed else "random"
    return requested


def _cost_model(ms: Any, kind: str, seed: int) -> Any:
    if kind == "xgb":
        return ms.cost_model.XGBModel(num_tuning_cores=1)
    return ms.cost_model.RandomModel(seed=seed)


def _search_knobs(
    task: _Task, device: Device, tuning_target: Any, measurer: _Measurer, default_seconds: float | None
) -> tuple[Any, float | None, float | None, int]:
    """edgeq's own schedules of ``task``, measured like the tuning candidates: its default (unless
    ``default_seconds`` is already known) and each other tile choice that changes its schedule.
    Returns (the fastest ScheduleKnobs or None, its seconds, the default's seconds, how many other
    choices were measured); the default's seconds are None when it could not be measured.

    A choice that beats the default is confirmed: both are timed once more and each keeps its
    faster timing (one slow timing of the default must not hand its kernel to another tile)."""
    import tvm_ffi

    from .compiler import tvm_target
    from .schedules import cpu_info
    from .schedules.rules import KNOB_CANDIDATES, schedule_func

    info = cpu_info(tvm_target(device))
    func = task.mod["main"]
    seen = [schedule_func(func, info) or func]
    if default_seconds is None:
        default_seconds = _measure(seen[0], func, tuning_target, measurer)
        if default_seconds is None:
            return None, None, None, 0
    best: tuple[float, Any, Any] | None = None  # (seconds, scheduled function, knobs)
    for knobs in KNOB_CANDIDATES:
        scheduled = schedule_func(func, info, knobs)
        if scheduled is None or any(tvm_ffi.structural_equal(scheduled, other) for other in seen):
            continue
        seen.append(scheduled)
        seconds = _measure(scheduled, func, tuning_target, measurer)
        if seconds is not None and (best is None or seconds < best[0]):
            best = (seconds, scheduled, knobs)
    if best is None:
        return None, None, default_seconds, len(seen) - 1
    seconds, scheduled, knobs = best
    if _knobs_win(seconds, default_seconds):
        default_seconds = min(default_seconds, _measure(seen[0], func, tuning_target, measurer) or default_seconds)
        seconds = min(seconds, _measure(scheduled, func, tuning_target, measurer) or seconds)
    return knobs, seconds, default_seconds, len(seen) - 1


def _measure(scheduled: Any, func: Any, tuning_target: Any, measurer: _Measurer) -> float | None:
    """Mean seconds of ``scheduled`` (a schedule of ``func``), built and run like the candidates."""
    import tvm

    ms = _meta_schedule()
    mod = tvm.IRModule({"main": scheduled})
    built = measurer.builder.build([ms.builder.BuilderInput(mod, tuning_target)])[0]
    if built.error_msg:
        return None
    try:
        runner_input = ms.runner.RunnerInput(built.artifact_path, "cpu", ms.arg_info.ArgInfo.from_prim_func(func))
        result = measurer.runner.run([runner_input])[0].result()
    finally:
        import shutil

        shutil.rmtree(os.path.dirname(built.artifact_path), ignore_errors=True)
    if result.error_msg or not result.run_secs:
        return None
    values = [float(s) for s in result.run_secs]
    return sum(values) / len(values)


def _progress_callback(ms: Any, report: Callable[[list[float | None]], None]) -> Any:
    from tvm.ir.utils import derived_object

    @derived_object
    class _Report(ms.measure_callback.PyMeasureCallback):
        def apply(self, _scheduler: Any, _task_id: int, _candidates: Any, builder_results: Any, runner_results: Any) -> None:
            times = []
            for built, ran in zip(builder_results, runner_results):
                ok = not built.error_msg and not ran.error_msg and ran.run_secs
                times.append(sum(float(s) for s in ran.run_secs) / len(ran.run_secs) if ok else None)
            report(times)

    return _Report()


@dataclass
class _Run:
    """What every task of one ``tune`` call shares."""

    options: TuneOptions
    device: Device
    target: Any  # the device's target with its core count, as MetaSchedule tunes for it
    key: str  # target_key of the device's target
    folder: Path
    database: Any
    recorded: dict[str, list[Any]]  # this target's records by workload, before this run
    defaults: dict[str, dict[str, dict[str, Any]]]  # edgeq_defaults.json
    measurer: _Measurer
    cost_model: str
    search_logger: logging.Logger
    say: Progress


def _tune_task(run: _Run, index: int, count: int, task: _Task) -> TaskResult:
    """Measure edgeq's own schedules once (its default and other tile choices), then run what is
    left of the task's MetaSchedule budget."""
    ms = _meta_schedule()
    digest = workload_key(run.database.commit_workload(task.mod).mod)
    done = len(run.recorded.get(digest, []))
    label = f"task {index}/{count} {_short(task.name)}"
    target_defaults = run.defaults.setdefault(run.key, {})
    entry = target_defaults.get(digest)
    if entry is None or "knobs" not in entry:  # edgeq's own schedules, whatever MetaSchedule's budget
        known = float(entry["seconds"]) if entry else None  # a database from before tile choices
        knobs, seconds, default_seconds, measured = _search_knobs(task, run.device, run.target, run.measurer, known)
        if default_seconds is not None:
            entry = target_defaults[digest] = {
                "task": task.name, "seconds": default_seconds,
                "knobs": knobs.to_dict() if knobs else None, "knob_seconds": seconds}
            _write_defaults(run.folder, run.defaults)
        if measured:
            run.say(f"{label}: edgeq's other tile choices, {measured} measured: best {_ms(_scaled(seconds))} "
                    f"(edgeq default {_ms(_scaled(default_seconds))})")
    default_ms = _scaled(entry["seconds"]) if entry else None
    knob_ms = _scaled(entry.get("knob_seconds")) if entry else None
    knob_dict = entry.get("knobs") if entry else None
    previous = [s for r in run.recorded.get(digest, []) if (s := _seconds(r)) is not None]
    state = {"done": done, "best": min(previous) * 1e3 if previous else None}
    remaining = max(0, task.budget - done)
    if remaining == 0:
        run.say(f"{label}: {done}/{task.budget} trials already in the database, "
                f"best {_ms(state['best'])} (edgeq default {_ms(default_ms)})")
    else:
        def report(times: list[float | None]) -> None:
            if not times:
                return
            state["done"] += len(times)
            valid = [t * 1e3 for t in times if t is not None and t < FAILED_SECONDS]
            if valid and (state["best"] is None or min(valid) < state["best"]):
                state["best"] = min(valid)
            failed = len(times) - len(valid)
            run.say(f"{label}: {state['done']}/{task.budget} trials, best {_ms(state['best'])} "
                    f"(edgeq default {_ms(default_ms)})" + (f", {failed} failed" if failed else ""))

        batch = min(remaining, MAX_BATCH)
        population = run.options.population or min(512, max(32, 8 * batch))
        context = ms.TuneContext(
            mod=task.mod, target=run.target, space_generator="post-order-apply",
            search_strategy=ms.search_strategy.EvolutionarySearch(
                population_size=population, init_min_unmeasured=min(50, population)),
            task_name=task.name, logger=run.search_logger, rand_state=run.options.seed + index, num_threads=1,
        ).clone()
        callbacks = [*ms.measure_callback.MeasureCallback.create("default"), _progress_callback(ms, report)]
        try:
            ms.tune_tasks(
                tasks=[context], task_weights=[float(task.calls)], work_dir=str(run.folder),
                max_trials_global=remaining, max_trials_per_task=remaining, num_trials_per_iter=batch,
                builder=run.measurer.builder, runner=run.measurer.runner, database=run.database,
                cost_model=_cost_model(ms, run.cost_model, run.options.seed), measure_callbacks=callbacks,
                task_scheduler="round-robin",
            )
        except EdgeqError:
            raise
        except Exception as error:  # noqa: BLE001 - TVM raises assorted errors
            # One kernel MetaSchedule cannot handle keeps edgeq's schedule; the others still tune.
            run.say(f"{label}: MetaSchedule cannot tune it ({_last_line(error)}); packaging keeps "
                    "edgeq's default")
    records = _records_by_workload(run.database, run.key).get(digest, [])
    timed = [s for r in records if (s := _seconds(r)) is not None]
    return TaskResult(
        name=task.name, calls=task.calls, flops=task.flops, budget=task.budget, trials_total=len(records),
        trials_now=state["done"] - done, best_ms=min(timed) * 1e3 if timed else None, default_ms=default_ms,
        knob_ms=knob_ms, knobs=knob_dict)


def _scaled(seconds: float | None) -> float | None:
    """Seconds to milliseconds, keeping None."""
    return None if seconds is None else float(seconds) * 1e3


def tune(model_path: str | os.PathLike[str], options: TuneOptions = TuneOptions(),
         progress: Progress | None = None) -> TuneResult:
    """Tune ``model_path``'s kernels for ``options.device`` with MetaSchedule into ``options.database``.

    Measures on this machine, or on the device over RPC when ``remote`` or ``tracker`` is set.
    Re-running with the same database resumes: recorded trials count against each task's share of
    ``trials``. Progress lines (task i/n, trials, best-so-far latency) go to ``progress``.
    """
    import tvm

    from .compiler import tvm_target

    started = time.perf_counter()
    say = progress or (lambda _: None)
    _meta_schedule()
    device = get_device(options.device)
    device.require_buildable()
    if device.kind != "cpu":
        raise UnsupportedModelError(f"edgeq tune tunes CPU kernels; device {device.name!r} is {device.kind}")
    cost_model = _cost_model_kind(options.cost_model)
    key = target_key(tvm_target(device))
    folder = Path(options.database)
    with _quiet_meta_schedule(options.verbose) as search_logger:
        say(f"importing {Path(model_path).name} as edgeq's CPU pipeline builds it")
        mod = tuning_module(model_path, device)
        measurer = _measurer(device, options)
        target = tvm.target.Target({**device.tvm_target, "num-cores": measurer.num_cores})
        tasks, total = _extract_tasks(mod, target, options)
        if not tasks:
            hint = f" matching {', '.join(options.task_filter)}" if options.task_filter else ""
            raise EdgeqError(f"{Path(model_path).name} has no tunable tasks{hint} ({total} in the model); "
                             "run with --list-tasks to see their names")
        _split_budget(tasks, options.trials)
        database = _open_database(folder, create=True)
        run = _Run(options, device, target, key, folder, database, _records_by_workload(database, key),
                   _read_defaults(folder), measurer, cost_model, search_logger, say)
        say(f"{len(tasks)} of {total} tasks, {options.trials} trials, measuring on {measurer.where}, "
            f"database {folder}")
        results = tuple(_tune_task(run, index, len(tasks), task) for index, task in enumerate(tasks, 1))
    return TuneResult(
        model=Path(model_path).name, device=device.name, target=dict(device.tvm_target or {}),
        measured_on=measurer.where, database=folder, tasks=results, tasks_in_model=total,
        cost_model=cost_model, seconds=time.perf_counter() - started)


def list_tasks(model_path: str | os.PathLike[str], device: str = "x86_64") -> list[tuple[str, int, float]]:
    """The model's tuning tasks, heaviest first: (name, calls, estimated FLOPs)."""
    import tvm

    dev = get_device(device)
    with _quiet_meta_schedule(False):
        mod = tuning_module(model_path, dev)
        target = tvm.target.Target({**(dev.tvm_target or {}), "num-cores": dev.num_cores or os.cpu_count() or 1})
        tasks, _total = _extract_tasks(mod, target, TuneOptions(device=device))
    return [(t.name, t.calls, t.flops) for t in tasks]


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f} ms"


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


__all__ = [
    "TaskResult",
    "TunedKernels",
    "TuneOptions",
    "TuneResult",
    "apply_tuning_database",
    "best_records",
    "list_tasks",
    "target_key",
    "tune",
    "tuning_module",
]
