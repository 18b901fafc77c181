"""CLI glue for ``edgeq tune``: MetaSchedule tuning into a database ``edgeq package`` reads.

Columns: MetaSchedule's best trial, edgeq's default schedule and edgeq's best other tile choice
("tiles"), each measured alone; packaging uses the fastest (a tile choice only when 2% faster)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def _progress_printer() -> Any:
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    return say


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def print_result(result: Any, out: Any = sys.stdout) -> None:
    """One line per task, then the totals and where the database is."""
    print(f"{'task':<52} {'calls':>5} {'trials':>9} {'best ms':>9} {'edgeq ms':>9} {'tiles ms':>9}  packaging uses",
          file=out)
    for task in result.tasks:
        name = task.name if len(task.name) <= 52 else task.name[:51] + "…"
        print(f"{name:<52} {task.calls:>5} {task.trials_total:>4}/{task.budget:<4} {_ms(task.best_ms):>9} "
              f"{_ms(task.default_ms):>9} {_ms(task.knob_ms):>9}  {task.uses}", file=out)
    estimate = result.estimated_ms
    default = result.default_ms
    summary = (f"{len(result.tasks)} of {result.tasks_in_model} tasks, {result.trials_now} trials now, "
               f"{result.trials_total} in the database, measured on {result.measured_on}, "
               f"cost model {result.cost_model}, {result.seconds:.0f} s")
    print(summary, file=out)
    if estimate is not None and default is not None:
        print(f"kernel time of these tasks: {estimate:.4f} ms with the database, {default:.4f} ms with edgeq's "
              "default schedules", file=out)
    print(f"database {result.database}: package with `edgeq package MODEL --device {result.device} "
          f"--tuning-db {result.database}`", file=out)


def cmd_tune(args: argparse.Namespace) -> int:
    from .tune import TuneOptions, list_tasks, tune

    if args.list_tasks:
        for name, calls, flops in list_tasks(args.model, args.device):
            print(f"{name}  calls={calls}  flops={flops:.0f}")
        return 0
    options = TuneOptions(
        device=args.device, trials=args.trials, database=args.db, remote=args.remote, tracker=args.tracker,
        key=args.key or "", token=args.token, timeout=args.timeout, seed=args.seed, cost_model=args.cost_model,
        task_filter=tuple(args.task or ()), max_tasks=args.max_tasks, verbose=args.verbose,
    )
    result = tune(args.model, options, progress=_progress_printer())
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_result(result)
    return 0


def add_tune_parser(subparsers: Any) -> None:
    """Add ``tune`` to the ``edgeq`` command's subparsers."""
    from .serve import TOKEN_ENV

    p = subparsers.add_parser("tune", help="tune a model's kernels with MetaSchedule for `package --tuning-db`")
    p.add_argument("model", type=Path, help="a .tflite model")
    p.add_argument("--device", "-d", default="x86_64", help="deploy target (see `edgeq devices`)")
    p.add_argument("--trials", type=int, default=64, help="measured trials for the model, split over its tasks "
                   "(heaviest first); trials already in the database count (default 64; 0: only edgeq's own tile "
                   "choices are measured)")
    p.add_argument("--db", "--tuning-db", dest="db", type=Path, default=Path("edgeq-tuning"),
                   help="tuning database folder, created or resumed (default ./edgeq-tuning)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--remote", metavar="HOST:PORT", help="measure on a device running `edgeq serve`")
    where.add_argument("--tracker", metavar="HOST:PORT", help="measure on a device from this TVM tracker (--key)")
    p.add_argument("--key", help="device key (with --tracker)")
    p.add_argument("--token", default=None, help=f"the server's shared secret (default ${TOKEN_ENV})")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per build and per measurement (default 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cost-model", choices=["auto", "xgb", "random"], default="auto",
                   help="search cost model: xgb needs xgboost (pip install xgboost-cpu); auto uses it when "
                        "installed, else random")
    p.add_argument("--task", action="append", metavar="TEXT",
                   help="only tasks whose name contains TEXT (repeatable; see --list-tasks)")
    p.add_argument("--max-tasks", type=int, help="only the N heaviest tasks")
    p.add_argument("--list-tasks", action="store_true", help="print the model's tasks, heaviest first, and stop")
    p.add_argument("--verbose", action="store_true", help="show MetaSchedule's own log")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_tune)
