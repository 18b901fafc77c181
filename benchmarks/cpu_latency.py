"""CPU latency of the shared TFLite models: edgeq default schedules vs stock TVM vs TFLite.

One table per model: median latency over repeated runs and the ratio to the TFLite reference
interpreter (XNNPACK, same thread count). A sample of a small model is the mean of back-to-back
calls lasting at least 2 ms (``MIN_SAMPLE_S``). Every runtime is timed twice - alone, after a quiet
pause in which the other runtimes' worker threads stop spinning, and in shared rounds (a few runs
of each in turn, so that a slow spell of the machine falls on all of them) - and each row shows the
lower of its two medians: no runtime is measured only while another one's threads compete with it.
Rows:

* ``edgeq``       -- stock ``from_tflite`` import (QDQ float for quantized models), built with
                     :func:`edgeq.schedules.build_cpu`;
* ``edgeq int8``  -- integer import (:func:`edgeq.int8.import_integer`) built with ``build_cpu``,
                     only for quantized models and when ``edgeq.int8`` is available;
* ``edgeq int8 tuned`` -- the same with an ``edgeq tune`` database (``--tuning-db DIR``);
* ``stock TVM``   -- the same stock import through ``tvm.compile`` (cpu_generic, no schedules);
* ``TFLite``      -- ``ai_edge_litert`` interpreter.

A network shipped as ``NAME_int8.tflite`` and ``NAME_float32.tflite`` also gets a table of its int8
bundle against its float bundle, timed the same way, and the int8 speed-up.

    python benchmarks/cpu_latency.py [--threads 2] [--repeat 30] [--mcpu haswell | --device x86_64-vnni] [--no-stock]
                                      [--tuning-db DIR]
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO.parent / "shared" / "models" / "tflite"
DEFAULT_MODELS = tuple(sorted(p.name for p in MODELS.glob("*.tflite"))) if MODELS.is_dir() else ()


# A sample times this long a stretch of back-to-back calls (at least one call): a model of 20 us
# timed call by call carries the timer's and the Python call's ~1-2 us, and one call's worth of
# noise, in every sample.
MIN_SAMPLE_S = 0.002


def _calls_per_sample(run: Callable[[], object], warmup: int) -> int:
    """Warm ``run`` up; how many back-to-back calls make a sample of :data:`MIN_SAMPLE_S`."""
    start = time.perf_counter()
    for _ in range(warmup):
        run()
    per_call = (time.perf_counter() - start) / warmup
    return max(1, min(1000, round(MIN_SAMPLE_S / max(per_call, 1e-9))))


def _interleaved_medians(runs: list[tuple[Callable[[], object], int]], burst: int = 3, warmup: int = 3) -> list[float]:
    """Median ms per call of each ``(run, repeat)``: ``repeat`` samples, each the mean of enough
    back-to-back calls to last :data:`MIN_SAMPLE_S` (one call for models slower than that), timed in
    rounds of ``burst`` samples of each runtime in turn, so that a slow spell of a shared machine
    falls on all runtimes alike rather than on one row (bursts keep each runtime's worker threads
    awake as in a steady stream of inferences)."""
    calls = [_calls_per_sample(run, warmup) for run, _ in runs]
    times: list[list[float]] = [[] for _ in runs]
    while any(len(samples) < repeat for (_, repeat), samples in zip(runs, times)):
        for (run, repeat), samples, count in zip(runs, times, calls):
            for _ in range(min(burst, repeat - len(samples))):
                start = time.perf_counter()
                for _ in range(count):
                    run()
                samples.append((time.perf_counter() - start) / count)
    return [statistics.median(samples) * 1e3 for samples in times]


def _run_for(run: Callable[[], object], seconds: float) -> None:
    """Call ``run`` for at least ``seconds`` (and at least three times)."""
    end = time.perf_counter() + seconds
    for count in itertools.count():
        run()
        if count >= 2 and time.perf_counter() >= end:
            return


def _best_medians(
    runs: list[tuple[Callable[[], object], int]], quiet_s: float = 2.0, warm_s: float = 0.3
) -> list[tuple[float, float, float]]:
    """(lower, alone, shared) of each runtime's median alone (after ``quiet_s`` of quiet and
    ``warm_s`` of warm-up runs) and in shared rounds.

    Right after a runtime's runs its worker threads keep spinning for a while (TVM's pool yields
    in a loop, XNNPACK's spins): a runtime timed just after another one's runs shares the cores
    with them. Timed only in shared rounds, XNNPACK read half its speed next to TVM, and TVM's
    kernels read slower next to XNNPACK."""
    alone = []
    for run, repeat in runs:
        time.sleep(quiet_s)
        _run_for(run, warm_s)  # wake the threads (and an idle virtual CPU) back up first
        alone += _interleaved_medians([(run, repeat)])
    shared = _interleaved_medians(runs)
    return [(min(a, b), a, b) for a, b in zip(alone, shared)]


def _inputs(shapes_dtypes: list[tuple[list[int], str]]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for shape, dtype in shapes_dtypes:
        if np.issubdtype(np.dtype(dtype), np.integer):
            info = np.iinfo(dtype)
            out.append(rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype))
        else:
            out.append(rng.standard_normal(shape).astype(dtype))
    return out


def _tvm_runner(executable: object, inputs: list[np.ndarray]) -> Callable[[], object]:
    import tvm
    from tvm import relax

    dev = tvm.cpu()
    vm = relax.VirtualMachine(executable, dev)
    main = vm["main"]  # looked up once, as an application calling it in a loop does
    args = [tvm.runtime.tensor(x, dev) for x in inputs]
    return lambda: main(*args)


def _relax_inputs(mod: object) -> list[tuple[list[int], str]]:
    return [([int(s) for s in p.ty.shape], str(p.ty.dtype)) for p in mod["main"].params]


def bench_model(
    path: Path, target: object, threads: int, repeat: int, stock: bool, tuning_db: Path | None = None
) -> list[tuple[str, float | None, str]]:
    """Return rows (name, median ms or None, note) for one model."""
    import tflite
    import tvm
    import tvm.relax.frontend.tflite  # noqa: F401  (registers from_tflite)
    from ai_edge_litert.interpreter import Interpreter

    from edgeq.schedules import build_cpu

    rows: list[tuple[str, float | None, str]] = []
    timed: list[tuple[int, Callable[[], object], int]] = []  # (row, run, repeat): timed together at the end

    def add(name: str, run: Callable[[], object], note: str = "", runs: int = repeat) -> None:
        timed.append((len(rows), run, runs))
        rows.append((name, None, note))
    log = lambda msg: print(f"  ... {msg}", file=sys.stderr, flush=True)  # noqa: E731
    interp = Interpreter(model_path=str(path), num_threads=threads)
    interp.allocate_tensors()
    details = interp.get_input_details()
    ref_inputs = _inputs([(list(d["shape"]), np.dtype(d["dtype"]).name) for d in details])

    def run_ref() -> None:
        for d, x in zip(details, ref_inputs):
            interp.set_tensor(d["index"], x)
        interp.invoke()

    mod = tvm.relax.frontend.tflite.from_tflite(tflite.Model.GetRootAsModel(path.read_bytes(), 0))
    inputs = _inputs(_relax_inputs(mod))
    log("edgeq build")
    start = time.perf_counter()
    executable = build_cpu(mod, target)
    add("edgeq QDQ-float (stock import)", _tvm_runner(executable, inputs), f"build {time.perf_counter() - start:.1f} s")
    if "int8" in path.name or "uint8" in path.name:
        try:
            from edgeq.int8 import import_integer

            log("int8 import + build")

            row_name = "edgeq int8 (import_integer)"
            imod, _report = import_integer(str(path))
            executable = build_cpu(imod, target)
            add(row_name, _tvm_runner(executable, _inputs(_relax_inputs(imod))))
            if tuning_db is not None:
                log("int8 build with the tuning database")
                row_name = "edgeq int8 tuned (--tuning-db)"
                executable = build_cpu(imod, target, tuning_db=tuning_db)
                add(row_name, _tvm_runner(executable, _inputs(_relax_inputs(imod))))
        except Exception as err:  # noqa: BLE001  (a benchmark row, not a product path)
            rows.append((row_name, None, f"{type(err).__name__}: {str(err)[:60]}"))
    if stock:
        log("stock build")
        executable = tvm.compile(mod, target=target)
        add("stock TVM (cpu_generic)", _tvm_runner(executable, inputs), runs=max(3, repeat // 5))
    add("TFLite reference", run_ref, f"{threads} threads, XNNPACK")
    log("timing: each runtime alone, then a few runs of each in turn")
    medians = _best_medians([(run, runs) for _, run, runs in timed])
    for (row, _, _), (ms, alone, shared) in zip(timed, medians):
        note = ", ".join(part for part in (rows[row][2], f"alone {alone:.3f}, shared {shared:.3f}") if part)
        rows[row] = (rows[row][0], ms, note)
    return rows


def bench_int8_against_float(int8_path: Path, float_path: Path, target: object, repeat: int) -> tuple[float, float]:
    """Median ms of the int8 bundle of a network and of its float32 twin's bundle (:func:`_best_medians`)."""
    import tflite
    import tvm.relax.frontend.tflite  # noqa: F401  (registers from_tflite)

    from edgeq.int8 import import_integer
    from edgeq.schedules import build_cpu

    imod, _report = import_integer(str(int8_path))
    int8_run = _tvm_runner(build_cpu(imod, target), _inputs(_relax_inputs(imod)))
    fmod = tvm.relax.frontend.tflite.from_tflite(tflite.Model.GetRootAsModel(float_path.read_bytes(), 0))
    float_run = _tvm_runner(build_cpu(fmod, target), _inputs(_relax_inputs(fmod)))
    (int8_ms, _, _), (float_ms, _, _) = _best_medians([(int8_run, repeat), (float_run, repeat)])
    return int8_ms, float_ms


def _int8_float_pairs(paths: list[Path]) -> list[tuple[Path, Path]]:
    """(int8, float32) files of the same network: ``NAME_int8.tflite`` next to ``NAME_float32.tflite``."""
    by_name = {p.name: p for p in paths}
    return [
        (p, by_name[p.name.replace("_int8.tflite", "_float32.tflite")])
        for p in paths
        if p.name.endswith("_int8.tflite") and p.name.replace("_int8.tflite", "_float32.tflite") in by_name
    ]


def _default_target(mcpu: str | None, threads: int, device: str | None = None) -> object:
    import tvm

    if device:
        from edgeq.devices import get_device

        return tvm.target.Target({**get_device(device).tvm_target, "num-cores": threads})
    if platform.machine() in ("aarch64", "arm64"):
        spec = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu or "cortex-a72", "mattr": ["+neon"]}
    else:
        spec = {"kind": "llvm", "mcpu": mcpu or "haswell"}
    spec["num-cores"] = threads
    return tvm.target.Target(spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="tflite files (default: shared models)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--mcpu", default=None, help="LLVM CPU name (default haswell / cortex-a72)")
    parser.add_argument("--device", default=None, help="take the TVM target of an edgeq device (e.g. x86_64-vnni)")
    parser.add_argument("--no-stock", action="store_true", help="skip the (slow) stock TVM build")
    parser.add_argument("--tuning-db", type=Path, help="an `edgeq tune` database: adds an 'edgeq int8 tuned' row")
    args = parser.parse_args(argv)
    # The TVM thread pool reads TVM_NUM_THREADS once, when it starts.
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(REPO))

    paths = [Path(m) for m in args.models] or [MODELS / m for m in DEFAULT_MODELS]
    target = _default_target(args.mcpu, args.threads, args.device)
    print(f"target {target}, {args.threads} threads, median of {args.repeat} runs")
    for path in paths:
        if not path.exists():
            print(f"\n{path.name}: missing, skipped")
            continue
        print(f"\n{path.name}", flush=True)
        rows = bench_model(path, target, args.threads, args.repeat, not args.no_stock, args.tuning_db)
        ref = rows[-1][1]
        print(f"| {'runtime':<30} | {'median ms':>9} | {'x reference':>11} | note")
        print(f"|{'-' * 32}|{'-' * 11}|{'-' * 13}|-----")
        for name, ms, note in rows:
            shown = f"{'-':>9}" if ms is None else f"{ms:9.3f}" if ms < 1 else f"{ms:9.2f}"
            ratio = f"{ms / ref:11.2f}" if ms is not None and ref else f"{'-':>11}"
            print(f"| {name:<30} | {shown} | {ratio} | {note}")
    for int8_path, float_path in _int8_float_pairs([p for p in paths if p.exists()]):
        network = int8_path.name.removesuffix("_int8.tflite")
        print(f"\n{network}: int8 bundle vs float32 bundle (edgeq default schedules)", flush=True)
        int8_ms, float_ms = bench_int8_against_float(int8_path, float_path, target, args.repeat)
        print(f"| {'bundle':<30} | {'median ms':>9} | {'speed-up':>11}")
        print(f"|{'-' * 32}|{'-' * 11}|{'-' * 13}")
        print(f"| {int8_path.name:<30} | {int8_ms:9.3f} | {float_ms / int8_ms:10.2f}x")
        print(f"| {float_path.name:<30} | {float_ms:9.3f} | {1.0:10.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
