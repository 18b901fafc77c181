"""CLI glue for remote testing: ``edgeq serve``, ``edgeq remote-test`` and ``edgeq bench``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .errors import RemoteError

EXIT_ERROR = 1  # a device could not be tested (connection, token, architecture, timeout)
EXIT_DISAGREE = 3  # every device answered, but agreement fell below the thresholds


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import ServeOptions, parse_address, serve

    tracker = parse_address(args.tracker) if args.tracker else None
    if tracker and not args.key:
        raise RemoteError("--tracker needs --key (the device key clients ask for, e.g. rpi4)")
    serve(ServeOptions(
        host=args.host, port=args.port, key=args.key or "", tracker=tracker, token=args.token,
        runtime=args.runtime, custom_addr=args.custom_addr, session_timeout=args.session_timeout,
    ))
    return 0


def _percent(share: float) -> str:
    return f"{100 * share:.1f}%"


def _steps(value: float) -> str:
    return f"{value:g}"


def print_report(report: Any, out: Any = sys.stdout) -> None:
    """The human-readable remote-test report: per picture (one device) and one row per device."""
    t = report.thresholds
    print(f"bundle     {report.bundle}", file=out)
    engine = "onnxruntime" if report.model.lower().endswith(".onnx") else "TFLite reference kernels"
    print(f"reference  {report.model} ({engine})", file=out)
    print(f"thresholds max steps <= {t.max_steps:g}, identical >= {_percent(t.min_identical)}, "
          f"top-1 agreement >= {_percent(t.min_top1)}", file=out)
    if len(report.devices) == 1 and report.devices[0].pictures:
        print(f"\n{'picture':<28} {'max steps':>9} {'identical':>9}  top-1 device/reference", file=out)
        for p in report.devices[0].pictures:
            mark = "" if p.top1_agrees else "  <- differs"
            print(f"{p.picture:<28} {_steps(p.max_steps):>9} {_percent(p.identical):>9}  "
                  f"{p.top1_device}/{p.top1_reference}{mark}", file=out)
    header = (f"{'device':<22} {'host':<12} {'arch':<8} {'pics':>4} {'max steps':>9} {'identical':>9} "
              f"{'top-1':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}  result")
    print("\n" + header, file=out)
    print("-" * len(header), file=out)
    for d in report.devices:
        host = d.info.hostname if d.info else "?"
        arch = d.info.arch if d.info else "?"
        lat = d.latency
        timing = (f"{lat.p50_ms:>8.2f} {lat.p90_ms:>8.2f} {lat.p99_ms:>8.2f}" if lat else f"{'-':>8} {'-':>8} {'-':>8}")
        if d.error:
            result = "ERROR"
        else:
            result = "PASS" if d.passed else "FAIL (below thresholds)"
        agreement = (f"{_steps(d.max_steps):>9} {_percent(d.identical):>9} {_percent(d.top1_agreement):>7}"
                     if d.pictures else f"{'-':>9} {'-':>9} {'-':>7}")
        print(f"{d.device:<22} {host[:12]:<12} {arch:<8} {len(d.pictures):>4} {agreement} {timing}  {result}", file=out)
    for d in report.devices:
        if d.error:
            print(f"error: {d.error}", file=out)


def _exit_status(report: Any) -> int:
    if report.errors:
        return EXIT_ERROR
    return 0 if report.passed else EXIT_DISAGREE


def cmd_remote_test(args: argparse.Namespace) -> int:
    from .remote import Thresholds, remote_test

    thresholds = Thresholds(max_steps=args.max_steps, min_identical=args.min_identical, min_top1=args.min_top1)
    report = remote_test(
        args.bundle, remote=args.remote, tracker=args.tracker, key=args.key or "", model=args.model,
        images=args.images, repeat=args.repeat, token=args.token, timeout=args.timeout, thresholds=thresholds,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report)
    status = _exit_status(report)
    sys.stdout.flush()
    if any(d.error and "no answer within" in d.error for d in report.devices):
        # A worker is still blocked in the RPC library on a hung device: leave without waiting for it.
        sys.stderr.flush()
        os._exit(status)
    return status


def cmd_bench(args: argparse.Namespace) -> int:
    from .predictor import load
    from .serve import Latency

    predictor = load(args.bundle, num_threads=args.threads)
    latency = Latency.from_seconds(predictor.benchmark(repeat=args.repeat, warmup=args.warmup))
    if args.json:
        print(json.dumps({"bundle": str(args.bundle), "threads": predictor.num_threads, **asdict(latency)}))
    else:
        print(f"{args.bundle}: {latency} on {predictor.num_threads} thread(s)")
    return 0


def add_remote_commands(subparsers: Any) -> None:
    """Add ``serve``, ``remote-test`` and ``bench`` to the ``edgeq`` command's subparsers."""
    from .serve import DEFAULT_PORT, TOKEN_ENV

    p = subparsers.add_parser("serve", help="device side: accept remote tests over TVM RPC")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default loopback; anything else needs --token)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free)")
    p.add_argument("--tracker", metavar="HOST:PORT", help="register with this TVM RPC tracker")
    p.add_argument("--key", help="device key to register under (e.g. rpi4)")
    p.add_argument("--token", default=None, help=f"shared secret clients must present (default ${TOKEN_ENV})")
    p.add_argument("--runtime", help="bundle (or folder) whose TVM runtime to serve with; remembered")
    p.add_argument("--custom-addr", help="address the tracker gives clients (default: as it sees this device)")
    p.add_argument("--session-timeout", type=float, help="end sessions longer than this many seconds")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("remote-test", help="run, check and time a bundle on devices over TVM RPC")
    p.add_argument("bundle", type=Path)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--remote", metavar="HOST:PORT", help="one device running `edgeq serve`")
    where.add_argument("--tracker", metavar="HOST:PORT", help="a TVM tracker: test every free device under --key")
    p.add_argument("--key", help="device key (with --tracker)")
    p.add_argument("--model", type=Path, help="source model (default: the manifest's source next to the bundle)")
    p.add_argument("--images", type=Path, help="folder of pictures (default: 4 random input tensors)")
    p.add_argument("--repeat", type=int, default=20, help="timed runs on the device (0: no timing)")
    p.add_argument("--token", default=None, help=f"the servers' shared secret (default ${TOKEN_ENV})")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per device (default 120)")
    p.add_argument("--max-steps", type=float, default=1.0, help="largest allowed difference in quantization steps")
    p.add_argument("--min-identical", type=float, default=0.9, help="least share of identical output elements")
    p.add_argument("--min-top1", type=float, default=1.0, help="least share of pictures with the same top-1 class")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_remote_test)

    p = subparsers.add_parser("bench", help="time a bundle on this machine")
    p.add_argument("bundle", type=Path)
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
